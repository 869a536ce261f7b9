'use strict'
// JWT decision benchmark, run on demand against the BUILT code (not a test):
//   npm run build && node bench/jwt.js [rounds]
// Per-request cost of the access decision for one caller, three variants side by side:
//   plain L7      an L7 intention without JWT: jwtProvidersNeeded() (nothing) + decideRequest()
//   cached token  the same intention with a JWT requirement, the token already verified on this
//                 connection: tokensFor() answers synchronously from the connection's cache
//   fresh token   the same, on a new connection each time: a full ES256 verification by jose
// Variants alternate within each round; the report gives the median of the rounds' means, the
// spread (min–max of round means) and each variant's ratio to plain L7 per round.

const { generateKeyPairSync } = require('node:crypto')
const { SignJWT } = require('jose')
const { compilePolicy } = require('../dist/intentions/policy.js')
const { decideRequest, jwtProvidersNeeded, newVerdict } = require('../dist/intentions/request.js')
const { JwtProviders } = require('../dist/jwt/provider.js')
const { JwtAuthenticator } = require('../dist/jwt/request-tokens.js')

const ROUNDS = Number(process.argv[2] ?? 7)
const SYNC_N = 200_000
const ASYNC_N = 2_000
const silent = { warn () {}, info () {}, error () {}, debug () {} }
const ROUTER = { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false }
const CALLER = { partition: '', namespace: 'default', service: 'web' }

function policy (jwt) {
  const perm = (p) => (jwt ? { ...p, JWT: { Providers: [{ Name: 'idp', VerifyClaims: [{ Path: ['role'], Value: 'reader' }] }] } } : p)
  return compilePolicy({
    destination: 'api',
    defaultAllow: false,
    protocol: 'http',
    intentions: [{
      SourceNS: 'default',
      SourceName: 'web',
      DestinationNS: 'default',
      DestinationName: 'api',
      SourceType: 'consul',
      Precedence: 9,
      CreateIndex: 1,
      ModifyIndex: 1,
      Permissions: [
        { Action: 'deny', HTTP: { PathPrefix: '/admin' } },
        perm({ Action: 'allow', HTTP: { PathPrefix: '/v1/', Methods: ['GET'] } })
      ]
    }]
  })
}

async function main () {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' })
  const jwk = { ...publicKey.export({ format: 'jwk' }), kid: 'k1', alg: 'ES256' }
  const providers = new JwtProviders(silent, () => {})
  providers.update([{ Name: 'idp', Issuer: 'https://idp', JSONWebKeySet: { Local: { JWKS: Buffer.from(JSON.stringify({ keys: [jwk] })).toString('base64') } } }])
  const auth = new JwtAuthenticator(providers, silent)
  const token = await new SignJWT({ iss: 'https://idp', role: 'reader' }).setProtectedHeader({ alg: 'ES256', kid: 'k1' }).setExpirationTime('2h').sign(privateKey)
  const rawHeaders = ['Host', 'api', 'User-Agent', 'bench/1.0', 'Accept', '*/*', 'Authorization', `Bearer ${token}`]

  const plain = { policy: policy(false), normalization: null, router: ROUTER, agentDecides: false }
  const withJwt = { ...plain, policy: policy(true) }
  const route = { exempt: false, override: null }
  const view = { caller: CALLER, method: 'GET', url: '/v1/items?limit=5', rawHeaders, jwt: null }
  const verdict = newVerdict()
  const connection = {}

  const plainOnce = () => {
    const needed = jwtProvidersNeeded(plain, route, CALLER)
    view.jwt = null
    return needed.length === 0 && decideRequest(plain, route, view, verdict).outcome === 'allow'
  }
  const cachedOnce = () => {
    const needed = jwtProvidersNeeded(withJwt, route, CALLER)
    const tokens = auth.tokensFor({ rawHeaders, url: view.url, connection }, needed, Date.now())
    if (tokens instanceof Promise) throw new Error('expected a cached token')
    view.jwt = tokens
    return decideRequest(withJwt, route, view, verdict).outcome === 'allow'
  }
  const freshOnce = async () => {
    const needed = jwtProvidersNeeded(withJwt, route, CALLER)
    view.jwt = await auth.tokensFor({ rawHeaders, url: view.url, connection: {} }, needed, Date.now())
    return decideRequest(withJwt, route, view, verdict).outcome === 'allow'
  }
  // Warm up, and check every variant allows.
  if (!(await freshOnce())) throw new Error('fresh token denied')
  await auth.tokensFor({ rawHeaders, url: view.url, connection }, ['idp'], Date.now())
  for (let i = 0; i < 50_000; i++) if (!plainOnce() || !cachedOnce()) throw new Error('denied')

  const results = { plain: [], cached: [], fresh: [] }
  for (let r = 0; r < ROUNDS; r++) {
    let t0 = process.hrtime.bigint()
    for (let i = 0; i < SYNC_N; i++) plainOnce()
    results.plain.push(Number(process.hrtime.bigint() - t0) / SYNC_N)
    t0 = process.hrtime.bigint()
    for (let i = 0; i < SYNC_N; i++) cachedOnce()
    results.cached.push(Number(process.hrtime.bigint() - t0) / SYNC_N)
    t0 = process.hrtime.bigint()
    for (let i = 0; i < ASYNC_N; i++) await freshOnce()
    results.fresh.push(Number(process.hrtime.bigint() - t0) / ASYNC_N)
  }

  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
  const fmt = (ns) => (ns >= 1000 ? `${(ns / 1000).toFixed(2)} µs` : `${ns.toFixed(0)} ns`)
  process.stdout.write(`JWT decision cost per request, ${ROUNDS} rounds (median of round means, min–max, ratio to plain L7 per round: median)\n`)
  for (const [name, xs] of Object.entries(results)) {
    const ratios = xs.map((x, i) => x / results.plain[i])
    process.stdout.write(`  ${name.padEnd(7)} ${fmt(median(xs)).padStart(10)}   ${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))}   ×${median(ratios).toFixed(1)}\n`)
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack}\n`)
  process.exit(1)
})
