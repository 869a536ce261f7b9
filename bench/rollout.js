'use strict'
// Rollout benchmark, run on demand against the BUILT code (not a test):
//   npm run build && taskset -c 1 node bench/rollout.js
// The per-request check of the onRequest hook (Enforcer.check: cached identity, request
// decision, outcome applied) in plain enforcement, in shadow enforcement and with a candidate,
// on 1,000 intentions. Variants alternate within each round; prints per variant the median over
// rounds of the p50 batch mean (ns per request), and the per-round ratio to plain enforcement
// (median and min..max).

const { Enforcer } = require('../dist/enforcement.js')
const { Candidate } = require('../dist/candidate.js')
const { compilePolicy, newRuleMemo } = require('../dist/intentions/policy.js')
const { resolveOptions } = require('../dist/options.js')

const ROUNDS = 7
const BATCH = 1000
const BATCHES = 400
const N = 1000

function intentions (n) {
  const list = []
  for (let i = 0; i < n; i++) {
    const ixn = { SourceNS: 'default', SourceName: `svc-${i}`, DestinationNS: 'default', DestinationName: 'api', SourceType: 'consul', Precedence: 9, CreateIndex: 1, ModifyIndex: 1 }
    if (i % 3 === 1) {
      ixn.Permissions = [
        { Action: 'deny', HTTP: { PathPrefix: '/admin' } },
        { Action: 'allow', HTTP: { PathPrefix: '/v1/', Methods: ['GET', 'POST'] } }
      ]
    } else {
      ixn.Action = 'allow'
    }
    list.push(ixn)
  }
  return list
}

const live = { intentions: intentions(N), defaultAllow: false, protocol: 'http' }
const policy = compilePolicy({ destination: 'api', ...live })
const L7 = 'svc-997' // 997 % 3 === 1: an L7 intention
const identity = { uri: `spiffe://td.consul/ns/default/dc/dc1/svc/${L7}`, trustDomain: 'td.consul', partition: 'default', namespace: 'default', datacenter: 'dc1', service: L7 }
const noop = () => undefined
const log = { info: noop, debug: noop, warn: noop, error: noop, isLevelEnabled: () => false }
const ROUTE = { exempt: false, override: null, enforcement: null }
const ROUTER = { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false }
const headers = ['Host', 'api.service.consul', 'User-Agent', 'bench/1.0', 'Accept', '*/*']

function enforcer (enforcement, candidate) {
  // A cached identity, as a verified connection has it (with the memo of its rule).
  const peer = Object.freeze({ identity, reason: 'verified', notBefore: -Infinity, notAfter: Infinity, epoch: 0, rules: newRuleMemo() })
  const tls = { identities: { peer: () => peer } }
  const sync = { policy, normalization: null }
  return new Enforcer({
    tls,
    sync,
    router: ROUTER,
    authorizer: null,
    log,
    requestIdLabel: 'reqId',
    logDenials: resolveOptions({ service: 'api' }).logDenials,
    rollout: { enforcement, candidate }
  })
}

function request (path) {
  return { raw: { method: 'GET', url: path, rawHeaders: headers, headers: {} }, log, routeOptions: { url: '/*' }, consulSource: null, consulDecision: null }
}

/** p50 of batch means (ns per check). */
function measure (e, req) {
  let errors = 0
  const run = () => {
    const t0 = process.hrtime.bigint()
    for (let i = 0; i < BATCH; i++) if (e.check(req, ROUTE) !== null) errors++
    return Number(process.hrtime.bigint() - t0) / BATCH
  }
  for (let i = 0; i < 50; i++) run()
  const samples = []
  for (let i = 0; i < BATCHES; i++) samples.push(run())
  samples.sort((a, b) => a - b)
  return { p50: samples[Math.floor(samples.length / 2)], errors }
}

async function main () {
  const agreeing = new Candidate('api', { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: L7, Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/v1/' } }] }] }, log, () => live, noop)
  const disagreeing = new Candidate('api', { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: L7, Action: 'deny' }] }, log, () => live, noop)
  await agreeing.start()
  await disagreeing.start()
  const allow = request('/v1/items')
  const deny = request('/admin/x')
  const variants = [
    ['enforce, allowed request (baseline)', enforcer('enforce', null), allow],
    ['shadow, allowed request', enforcer('shadow', null), allow],
    ['enforce, denied request (403 error built)', enforcer('enforce', null), deny],
    ['shadow, would-be denial served', enforcer('shadow', null), deny],
    ['enforce + candidate that agrees', enforcer('enforce', agreeing), allow],
    ['enforce + candidate that disagrees (counted, logged)', enforcer('enforce', disagreeing), allow]
  ]
  const perRound = variants.map(() => [])
  for (let round = 0; round < ROUNDS; round++) {
    // Rotate the starting variant each round so no variant always runs first.
    for (let k = 0; k < variants.length; k++) {
      const v = (k + round) % variants.length
      const [, e, req] = variants[v]
      perRound[v].push(measure(e, req).p50)
    }
  }
  const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)] }
  const rows = variants.map(([name], v) => {
    const ratios = perRound[v].map((x, r) => x / perRound[0][r])
    return {
      variant: name,
      'median p50 (ns)': median(perRound[v]).toFixed(0),
      'ratio to baseline (median)': median(ratios).toFixed(2),
      'ratio min..max': `${Math.min(...ratios).toFixed(2)}..${Math.max(...ratios).toFixed(2)}`
    }
  })
  process.stdout.write(`node ${process.version}, ${N} intentions, ${ROUNDS} rounds x ${BATCHES} batches of ${BATCH} checks, variants alternated\n`)
  console.table(rows)
  process.stdout.write(`disagreements counted: ${disagreeing.disagreements.allowDeny}\n`)
}

main()
