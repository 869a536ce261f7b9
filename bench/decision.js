'use strict'
// Decision-engine benchmark, run on demand against the BUILT code (not a test):
//   npx tsc -p tsconfig.json && node bench/decision.js
// Prints the per-decision cost (p50/p99 of batch means, ns) for cached caller identities, with
// 1,000 and 10,000 intentions of which a third are L7, plus compile time and heap growth.

const v8 = require('node:v8')
const vm = require('node:vm')
const { compilePolicy, decide } = require('../dist/intentions/policy.js')
const { decideRequest, newVerdict } = require('../dist/intentions/request.js')

v8.setFlagsFromString('--expose-gc')
const gc = vm.runInNewContext('gc')

const BATCH = 1000
const BATCHES = 3000

/**
 * An intention list for `api`: n sources, every third L7, a few destination-wildcard ones. With
 * `uniqueRegex` every L7 intention has its own PathRegex (the worst case for memory).
 */
function intentions (n, uniqueRegex = true) {
  const list = []
  for (let i = 0; i < n; i++) {
    const base = {
      SourceNS: 'default',
      SourceName: `svc-${i}`,
      DestinationNS: 'default',
      DestinationName: i % 50 === 49 ? '*' : 'api',
      SourceType: 'consul',
      Precedence: i % 50 === 49 ? 6 : 9,
      CreateIndex: 1,
      ModifyIndex: 1
    }
    if (i % 3 === 1 && base.DestinationName === 'api') {
      base.Permissions = [
        { Action: 'deny', HTTP: { PathPrefix: '/admin' } },
        { Action: 'allow', HTTP: { PathPrefix: '/v1/', Methods: ['GET', 'POST'] } },
        { Action: 'deny', HTTP: { Header: [{ Name: 'x-debug', Present: true }] } },
        { Action: 'allow', HTTP: { PathRegex: `/items/[0-9]+/${uniqueRegex ? i : 'x'}`, Header: [{ Name: 'x-env', Exact: 'prod' }] } }
      ]
    } else {
      base.Action = i % 2 === 0 ? 'allow' : 'deny'
    }
    list.push(base)
  }
  // Transport order is not trusted; start from a shuffled list so the sort does real work.
  for (let i = list.length - 1; i > 0; i--) {
    const j = (i * 7919) % (i + 1)
    const t = list[i]; list[i] = list[j]; list[j] = t
  }
  return list
}

const headers = ['Host', 'api.service.consul', 'User-Agent', 'bench/1.0', 'Accept', '*/*', 'X-Env', 'prod',
  'X-Request-Id', '5b1d3c1e-0000-4000-8000-000000000000']

function scenarios (n) {
  let l7i = n - 1 // a late L7 intention (the index makes its position irrelevant)
  while (l7i % 3 !== 1 || l7i % 50 === 49) l7i--
  const caller = (name) => ({ partition: '', namespace: 'default', service: name })
  return [
    ['L4 intention', caller('svc-0'), { method: 'GET', path: '/v1/items', url: '/v1/items', rawHeaders: headers }],
    ['default (no match)', caller('nobody'), { method: 'GET', path: '/v1/items', url: '/v1/items', rawHeaders: headers }],
    ['L7, 1st permission', caller(`svc-${l7i}`), { method: 'GET', path: '/admin/x', url: '/admin/x', rawHeaders: headers }],
    ['L7, 2nd permission', caller(`svc-${l7i}`), { method: 'GET', path: '/v1/items', url: '/v1/items', rawHeaders: headers }],
    ['L7, regex+header (4th)', caller(`svc-${l7i}`),
      { method: 'GET', path: `/items/42/${l7i}`, url: `/items/42/${l7i}`, rawHeaders: headers }]
  ]
}

const ROUTER = { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false }

/**
 * mode 'cached': one identity object; 'fresh': a new one per call; 'request': the whole request
 * decision the hook runs (normalization, router spellings, routed path, intentions).
 */
function measure (policy, caller, req, mode) {
  let sink = 0
  const service = { policy, normalization: null, router: ROUTER, agentDecides: false }
  const route = { exempt: false, override: null }
  const view = { caller, method: req.method, url: req.url, rawHeaders: req.rawHeaders }
  const verdict = newVerdict()
  const run = () => {
    const t0 = process.hrtime.bigint()
    for (let i = 0; i < BATCH; i++) {
      if (mode === 'request') {
        if (decideRequest(service, route, view, verdict).outcome === 'allow') sink++
      } else {
        const who = mode === 'fresh' ? { partition: caller.partition, namespace: caller.namespace, service: caller.service } : caller
        if (decide(policy, who, req).allow) sink++
      }
    }
    return Number(process.hrtime.bigint() - t0) / BATCH
  }
  for (let i = 0; i < 200; i++) run() // warm up (JIT)
  const samples = []
  for (let i = 0; i < BATCHES; i++) samples.push(run())
  samples.sort((a, b) => a - b)
  return { p50: samples[Math.floor(samples.length * 0.5)], p99: samples[Math.floor(samples.length * 0.99)], sink }
}

function heapAfterGc () {
  gc(); gc()
  return process.memoryUsage().heapUsed
}

const rows = []
const info = []
for (const [n, uniqueRegex] of [[1000, true], [10000, true], [10000, false]]) {
  const list = intentions(n, uniqueRegex)
  const before = heapAfterGc()
  const t0 = process.hrtime.bigint()
  const policy = compilePolicy({ destination: 'api', intentions: list, defaultAllow: false, protocol: 'http' })
  const compileMs = Number(process.hrtime.bigint() - t0) / 1e6
  const heapDelta = heapAfterGc() - before
  info.push({ intentions: n, regexes: uniqueRegex ? 'one per L7 intention' : 'repeated', 'compile (ms)': compileMs.toFixed(1), 'heap delta (MiB)': (heapDelta / 1048576).toFixed(2) })
  if (!uniqueRegex) continue
  const row = (scenario, verdict, { p50, p99 }) =>
    rows.push({ intentions: n, scenario, verdict, 'p50 (ns)': p50.toFixed(0), 'p99 (ns)': p99.toFixed(0) })
  const all = scenarios(n)
  for (const [name, caller, req] of all) {
    row(name, decide(policy, caller, req).allow ? 'allow' : 'deny', measure(policy, caller, req, 'cached'))
  }
  row('L4, new identity object each call', '', measure(policy, all[0][1], all[0][2], 'fresh'))
  const [, caller, req] = all[3]
  row('request decision (decideRequest), L7 2nd, canonical', '', measure(policy, caller, req, 'request'))
  row('request decision (decideRequest), L7 2nd, with a query', '', measure(policy, caller, { ...req, url: '/v1/items?limit=5' }, 'request'))
}

process.stdout.write(`node ${process.version}, ${BATCHES} batches of ${BATCH} decisions, p50/p99 of batch means\n`)
console.table(rows)
console.table(info)
