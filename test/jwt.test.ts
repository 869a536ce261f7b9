// The JWT modules one by one: requirement compilation and claims (lib/intentions/jwt.ts), token
// locations, provider entries with Consul's rules and defaults, key sets, the verifier and the
// per-connection cache of verified tokens (lib/jwt/). docs/semantics.md#jwt.
import { sign } from 'node:crypto'
import { once } from 'node:events'
import { mkdtempSync, writeFileSync } from 'node:fs'
import https from 'node:https'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import type { Test } from 'tap'
import { SignJWT } from 'jose'
import type { FastifyBaseLogger } from 'fastify'
import { claimMatches, compileJwtRequirement, jwtSatisfied, providerNames, requirementFailures } from '../lib/intentions/jwt'
import { compileOverride, compilePolicy, jwtProvidersFor } from '../lib/intentions/policy'
import { findToken, DEFAULT_LOCATIONS } from '../lib/jwt/locations'
import type { TokenLocation } from '../lib/jwt/locations'
import { compileProvider, DEFAULT_CACHE_MS, InvalidProviderError, JwtProviders } from '../lib/jwt/provider'
import { newKeySet } from '../lib/jwt/key-sets'
import type { KeySetEvent } from '../lib/jwt/key-sets'
import { verifyToken } from '../lib/jwt/verifier'
import { JwtAuthenticator } from '../lib/jwt/request-tokens'
import { startDevAgent } from '../lib/dev-agent/index'
import { jwks, newIssuer } from './helpers/jwt'
import { ixn } from './helpers/intentions'

const silent = { warn: () => {}, info: () => {}, error: () => {}, debug: () => {} } as unknown as FastifyBaseLogger
const b64 = (doc: unknown): string => Buffer.from(typeof doc === 'string' ? doc : JSON.stringify(doc)).toString('base64')

t.test('requirements compile as Consul sends them; route sources are strict', async (t) => {
  t.equal(compileJwtRequirement(undefined, 'JWT', false), null)
  t.equal(compileJwtRequirement({}, 'JWT', false), null, 'no providers: no condition')
  t.equal(compileJwtRequirement({ Providers: null }, 'JWT', false), null)
  t.equal(compileJwtRequirement({ Providers: [] }, 'JWT', false), null)
  t.same(compileJwtRequirement({ Providers: [{ Name: 'a', VerifyClaims: [{ Path: ['x'], Value: 'y' }, {}] }] }, 'JWT', false),
    { providers: [{ name: 'a', claims: [{ path: ['x'], value: 'y' }, { path: [], value: '' }] }] })
  const bad: Array<[unknown, boolean, string]> = [
    ['x', false, 'JWT must be an object'],
    [{ Providers: {} }, false, 'JWT.Providers must be an array'],
    [{ Providers: ['a'] }, false, 'JWT.Providers[0] must be an object'],
    [{ Providers: [{}] }, false, 'JWT.Providers[0].Name must be a non-empty string'],
    [{ Providers: [{ Name: 'a', VerifyClaims: {} }] }, false, 'JWT.Providers[0].VerifyClaims must be an array'],
    [{ Providers: [{ Name: 'a', VerifyClaims: [1] }] }, false, 'JWT.Providers[0].VerifyClaims[0] must be an object'],
    [{ Providers: [{ Name: 'a', VerifyClaims: [{ Value: 1 }] }] }, false, 'JWT.Providers[0].VerifyClaims[0].Value must be a string'],
    [{ Providers: [{ Name: 'a', VerifyClaims: [{ Path: ['a'], Valeu: 'x' }] }] }, true, 'JWT.Providers[0].VerifyClaims[0].Valeu is not a known field (Path, Value)']
  ]
  for (const [raw, strict, message] of bad) t.throws(() => compileJwtRequirement(raw, 'JWT', strict), { message }, message)
  t.same(providerNames([null, compileJwtRequirement({ Providers: [{ Name: 'b' }, { Name: 'a' }] }, 'J', false), compileJwtRequirement({ Providers: [{ Name: 'a' }] }, 'J', false)]), ['b', 'a'])
})

t.test('claims: nested keys, exact strings, arrays by membership (docs/semantics.md#jwt-claims)', async (t) => {
  const payload = { role: 'admin', roles: ['a', 'b', 3], org: { team: { name: 'x' } }, n: 1, t: true }
  const cases: Array<[string[], string, boolean]> = [
    [['role'], 'admin', true], [['role'], 'Admin', false], [['roles'], 'b', true], [['roles'], '3', false],
    [['org', 'team', 'name'], 'x', true], [['org', 'team'], 'x', false], [['org', 'missing'], 'x', false],
    [['role', 'x'], 'admin', false], [['n'], '1', false], [['t'], 'true', false], [[], '', false], [['toString'], '', false]
  ]
  for (const [path, value, want] of cases) t.equal(claimMatches(payload, path, value), want, `${path.join('.')} = ${value}`)
  const requirement = compileJwtRequirement({ Providers: [{ Name: 'a', VerifyClaims: [{ Path: ['role'], Value: 'admin' }] }, { Name: 'b' }] }, 'J', false)
  if (requirement === null) throw new Error('unreachable')
  t.equal(jwtSatisfied(requirement, null), false, 'no tokens looked at')
  t.equal(jwtSatisfied(requirement, { payload: (n) => (n === 'a' ? { role: 'user' } : null) }), false, 'claim fails, other provider absent')
  t.equal(jwtSatisfied(requirement, { payload: (n) => (n === 'b' ? {} : null) }), true, 'providers are alternatives')
  // What the log says of each provider of a failed requirement: never a value.
  t.same(requirementFailures(requirement, { payload: (n) => (n === 'a' ? { role: 'user' } : null) }, {}),
    { a: 'claim "role" does not match VerifyClaims', b: 'no verified token' })
  t.same(requirementFailures(requirement, { payload: () => ({ role: 'admin' }) }, { b: 'token expired' }), { b: 'token expired' },
    'a provider whose claims hold is not named')
})

t.test('the providers a caller\'s deciding rule needs', async (t) => {
  const jwt = { Providers: [{ Name: 'okta' }] }
  const policy = compilePolicy({
    destination: 'api',
    defaultAllow: false,
    protocol: 'http',
    intentions: [ixn('web', 'api', 9, 'allow', { JWT: jwt }), ixn('ops', 'api', 9, [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'auth0' }, { Name: 'okta' }] } }])]
  })
  const web = { partition: '', namespace: 'default', service: 'web' }
  const ops = { partition: '', namespace: 'default', service: 'ops' }
  const db = { partition: '', namespace: 'default', service: 'db' }
  t.same(policy.jwtProviders, ['auth0', 'okta'], 'in rule order (ops sorts before web)')
  t.same(jwtProvidersFor(policy, null, web), ['okta'])
  t.same(jwtProvidersFor(policy, null, ops), ['auth0', 'okta'])
  t.same(jwtProvidersFor(policy, null, db), [])
  const override = compileOverride([{ name: 'web', action: 'allow', jwt: { Providers: [{ Name: 'route' }] } }])
  t.same(jwtProvidersFor(policy, override, web), ['route'], 'the override\'s rule first')
  t.same(jwtProvidersFor(policy, override, ops), ['auth0', 'okta'])
  t.same(jwtProvidersFor(policy, override, ops, true), [], 'mode agent: only overrides decide here')
  const plain = compilePolicy({ destination: 'api', defaultAllow: false, protocol: 'http', intentions: [ixn('web', 'api', 9, 'allow')] })
  t.same(jwtProvidersFor(plain, null, web), [], 'no requirement anywhere: nothing to look at')
  const tcp = compilePolicy({ destination: 'api', defaultAllow: true, protocol: 'tcp', intentions: [ixn('web', 'api', 9, 'allow', { JWT: jwt })] })
  t.same(jwtProvidersFor(tcp, null, web), [], 'not HTTP: no token is looked at...')
  t.match(tcp.warnings, [/require a JWT but the service protocol "tcp" is not HTTP-like/], '...the intention denies, logged once')
})

t.test('token locations: headers, then query parameters, then cookies', async (t) => {
  const locations: TokenLocation[] = [
    { kind: 'cookie', name: 'c', prefix: '', forward: true },
    { kind: 'query', name: 'q t', prefix: '', forward: true },
    { kind: 'header', name: 'x-token', prefix: 'T ', forward: false }
  ]
  t.same(findToken(locations, ['X-Token', 'T h1', 'cookie', 'c=c1'], '/?q%20t=q1')?.token, 'h1', 'a header first')
  t.same(findToken(locations, ['x-token', 'nope', 'cookie', 'c=c1'], '/?q+t=q1#frag')?.token, 'q1', 'a header without the prefix does not count')
  t.same(findToken(locations, ['cookie', 'a=1; c="c1"'], '/?other=1&q%20t=')?.token, 'c1', 'an empty query value does not count; quoted cookie')
  t.equal(findToken(locations, ['cookie', 'c=; d'], '/?q%20t=%E0%A4%A'), null, 'undecodable query, empty cookie')
  t.equal(findToken(locations, ['x-token', 'T  '], '/'), null, 'an empty token after the prefix')
  t.equal(findToken(DEFAULT_LOCATIONS, ['authorization', 'Basic x'], '/?access_token=a.b.c')?.token, 'a.b.c', 'defaults: Bearer, then access_token')
  t.equal(findToken(DEFAULT_LOCATIONS, ['Authorization', 'Bearer a.b.c'], '/')?.location.name, 'authorization')
  t.equal(findToken(DEFAULT_LOCATIONS, ['Authorization', 'Bearer a.b.c'], '/')?.repeated, false)
})

t.test('a token found in a header or query parameter sent more than once is marked repeated (docs/semantics.md#jwt-locations)', async (t) => {
  // Node hands the application the first `authorization` value: a forged token there, the checked one after it.
  const twice = findToken(DEFAULT_LOCATIONS, ['authorization', 'bearer forged', 'Authorization', 'Bearer a.b.c'], '/')
  t.same([twice?.token, twice?.repeated], ['a.b.c', true])
  t.equal(findToken(DEFAULT_LOCATIONS, ['authorization', 'Bearer a.b.c', 'authorization', 'Bearer a.b.c'], '/')?.repeated, true, 'even the same value twice')
  const query = findToken(DEFAULT_LOCATIONS, [], '/?access_token=&access_token=a.b.c')
  t.same([query?.token, query?.repeated], ['a.b.c', true], 'the query parser would make an array of it')
  t.equal(findToken(DEFAULT_LOCATIONS, ['authorization', 'Basic x', 'authorization', 'Basic y'], '/?access_token=a.b.c')?.repeated, false,
    'only where the token was found')
  t.equal(findToken(DEFAULT_LOCATIONS, [], '/?access_token&access_token=a.b.c')?.repeated, true, 'a name without "=" is the parameter, empty')
  t.equal(findToken(DEFAULT_LOCATIONS, [], '/?access_token'), null, 'and alone it holds no token')
  const cookies: TokenLocation[] = [{ kind: 'cookie', name: 'c', prefix: '', forward: true }]
  t.equal(findToken(cookies, ['cookie', 'c=a.b.c', 'cookie', 'c=x'], '/')?.repeated, false, 'a cookie keeps its first value in every parser: not refused')
  t.equal(findToken(cookies, ['cookie', 'c=; c=a.b.c'], '/'), null, 'the first cookie of the name is the one read, even empty')
  t.equal(findToken(cookies, ['cookie', 'd=a.b.c; cc=x', 'x-other', 'c=y'], '/'), null, 'no cookie of the name')
})

function throwsWith (t: Test, fn: () => unknown, type: new (...args: any[]) => Error, message: string): void {
  try {
    fn()
    t.fail(`should throw ${message}`)
  } catch (err) {
    t.ok(err instanceof type && err.message.includes(message), `${message}: ${(err as Error).message}`)
  }
}

t.test('provider entries: Consul\'s validation and defaults', async (t) => {
  const local = { Name: 'p', JSONWebKeySet: { Local: { JWKS: b64({ keys: [] }) } } }
  const remote = (r: Record<string, unknown>): Record<string, unknown> => ({ Name: 'p', JSONWebKeySet: { Remote: { URI: 'https://idp/jwks', ...r } } })
  const p = compileProvider(local, 'x')
  t.same([p.issuer, p.audiences, p.locations, p.forwardHeader, p.clockSkewSeconds], ['', [], DEFAULT_LOCATIONS, null, 30])
  t.equal(compileProvider({ ...local, ClockSkewSeconds: -5 }, 'x').clockSkewSeconds, 0)
  t.same(compileProvider({ Name: 'p', JSONWebKeySet: { Local: { Filename: '/etc/jwks.json' } } }, 'x').keySet, { kind: 'file', filename: '/etc/jwks.json' })
  // Wrapped as `base64` prints it: Go's decoder (Consul's) skips the line breaks.
  const wrapped = b64({ keys: [{ kty: 'oct', k: 'x'.repeat(120) }] }).replace(/.{76}/g, '$&\r\n')
  t.ok(wrapped.includes('\n'))
  t.same(compileProvider({ Name: 'p', JSONWebKeySet: { Local: { JWKS: wrapped } } }, 'x').keySet,
    { kind: 'inline', jwks: JSON.stringify({ keys: [{ kty: 'oct', k: 'x'.repeat(120) }] }) })
  const r = compileProvider(remote({ CacheDuration: 90e9, RetryPolicy: { NumRetries: 2.7, RetryPolicyBackOff: { BaseInterval: '250ms' } } }), 'x').keySet
  t.match(r, { kind: 'remote', cacheMs: 90_000, timeoutMs: 5000, retries: 2, backoffBaseMs: 250, backoffMaxMs: 2500, fetchAsynchronously: false, trustedCa: null })
  t.match(compileProvider(remote({}), 'x').keySet, { cacheMs: DEFAULT_CACHE_MS, backoffBaseMs: 1000, backoffMaxMs: 10_000 })
  t.match(compileProvider(remote({ URI: '/relative' }), 'x').keySet, { uri: '/relative' }, 'Consul accepts an absolute path')
  for (const [trusted, want] of [[{ InlineString: 'pem' }, 'pem'], [{ InlineBytes: b64('raw') }, 'raw'], [{ Filename: '/ca.pem' }, 'file:/ca.pem'], [{ EnvironmentVariable: 'CA' }, 'env:CA']] as const) {
    t.match(compileProvider(remote({ JWKSCluster: { TLSCertificates: { TrustedCA: trusted } } }), 'x').keySet, { trustedCa: want })
  }
  t.match(compileProvider({ ...local, Forwarding: { HeaderName: 'X-P', PadForwardPayloadHeader: true }, Audiences: ['a'] }, 'x'),
    { forwardHeader: 'x-p', padForwardPayload: true, audiences: ['a'] })
  t.same(compileProvider({ ...local, CreateIndex: 1 }, 'x').fingerprint, compileProvider({ ...local, CreateIndex: 2, ModifyIndex: 3 }, 'x').fingerprint, 'Raft indexes are not part of the fingerprint')

  const invalid: Array<[unknown, string]> = [
    [{ ...local, Name: '' }, 'Name is required'],
    [{ Name: 'p' }, 'JSONWebKeySet is required'],
    [{ Name: 'p', JSONWebKeySet: {} }, 'must specify exactly one of Local or Remote JSON Web key set'],
    [{ Name: 'p', JSONWebKeySet: { Local: {} } }, 'must specify exactly one of String or filename for local keyset'],
    [{ Name: 'p', JSONWebKeySet: { Local: { JWKS: 'a!' } } }, 'JWKS must be valid base64 encoded string'],
    [remote({ URI: '' }), 'Remote JWKS URI is required'],
    [remote({ URI: 'idp' }), 'Remote JWKS URI is invalid'],
    [remote({ RetryPolicy: { RetryPolicyBackOff: { BaseInterval: '2s', MaxInterval: '1s' } } }), 'MaxInterval should be greater or equal to BaseInterval'],
    [remote({ JWKSCluster: { TLSCertificates: {} } }), 'CaCertificateProviderInstance or TrustedCA'],
    [remote({ JWKSCluster: { TLSCertificates: { TrustedCA: {} } } }), 'Filename, EnvironmentVariable, InlineString or InlineBytes'],
    [{ ...local, Locations: [{}] }, 'must set exactly one of: JWT location header, query param or cookie'],
    [{ ...local, Locations: [{ Header: {} }] }, 'JWT location header name must be specified'],
    [{ ...local, Locations: [{ QueryParam: {} }] }, 'JWT location query param name must be specified'],
    [{ ...local, Locations: [{ Cookie: {} }] }, 'JWT location cookie name must be specified'],
    [{ ...local, Forwarding: {} }, 'Header name required for forwarding config']
  ]
  for (const [entry, message] of invalid) {
    throwsWith(t, () => compileProvider(entry, 'x'), InvalidProviderError, message)
  }
  const shape: Array<[unknown, string]> = [
    ['x', 'x must be an object'], [{ Name: 1 }, 'x.Name must be a string'], [{ ...local, Issuer: 1 }, 'x.Issuer must be a string'],
    [{ ...local, Audiences: 'a' }, 'x.Audiences must be an array'], [{ ...local, Audiences: [1] }, 'x.Audiences[0] must be a string'],
    [{ ...local, ClockSkewSeconds: '30' }, 'x.ClockSkewSeconds must be a number'], [{ ...local, JSONWebKeySet: 'x' }, 'x.JSONWebKeySet must be an object'],
    [{ ...local, Locations: ['x'] }, 'x.Locations[0] must be an object'], [{ ...local, Forwarding: { HeaderName: 'a', PadForwardPayloadHeader: 'yes' } }, 'PadForwardPayloadHeader must be a boolean'],
    [remote({ CacheDuration: 'soon' }), 'CacheDuration must be a duration'], [remote({ CacheDuration: -1 }), 'CacheDuration must be a duration']
  ]
  for (const [entry, message] of shape) throwsWith(t, () => compileProvider(entry, 'x'), TypeError, message)
})

t.test('the provider list keeps unchanged key sets and rejects a bad list whole', async (t) => {
  const events: KeySetEvent[] = []
  const providers = new JwtProviders(silent, (e) => events.push(e))
  const a = { Name: 'a', JSONWebKeySet: { Local: { JWKS: b64({ keys: [] }) } } }
  providers.update([a, { ...a, Name: 'b' }])
  const first = providers.get('a')
  providers.update([{ ...a, ModifyIndex: 9 }])
  t.equal(providers.get('a'), first, 'same entry, same key set')
  t.same(providers.names, ['a'])
  t.throws(() => providers.update([a, { Name: 'c' }]), InvalidProviderError)
  t.equal(providers.get('a'), first, 'a rejected list changes nothing')
  await providers.ready(['a', 'missing'])
  providers.stop()
  t.same(providers.names, [])
})

t.test('local key sets: inline and file; unusable documents', async (t) => {
  const issuer = await newIssuer('ES256')
  const dir = mkdtempSync(join(tmpdir(), 'jwks-'))
  writeFileSync(join(dir, 'jwks.json'), JSON.stringify(jwks(issuer)))
  const events: KeySetEvent[] = []
  const file = newKeySet('f', { kind: 'file', filename: join(dir, 'jwks.json') }, silent, (e) => events.push(e))
  await file.ready()
  t.equal(file.error, null)
  t.equal(file.generation, 1)
  const missing = newKeySet('m', { kind: 'file', filename: join(dir, 'nope.json') }, silent, (e) => events.push(e))
  await missing.ready()
  t.match(missing.error, /^cannot read .*nope\.json/)
  for (const [text, reason] of [['{', 'the key set is not JSON'], ['{"keys":{}}', 'the key set has no "keys" array'], ['null', 'the key set has no "keys" array']]) {
    const set = newKeySet('i', { kind: 'inline', jwks: text }, silent, () => {})
    await set.ready()
    t.equal(set.error, reason)
    const active = { config: compileProvider({ Name: 'i', JSONWebKeySet: { Local: { JWKS: b64(text) } } }, 'x'), keys: set }
    t.same(await verifyToken(await issuer.sign(), active, Date.now()), { ok: false, reason: `key set unavailable: ${reason}` })
    set.stop()
  }
  t.same(events.map((e) => [e.provider, e.keys]), [['f', 1], ['m', null]])
  file.stop()
  missing.stop()
})

/** A token whose header marks an extension critical (jose refuses to sign one, so it is signed here). */
function critToken (issuer: Awaited<ReturnType<typeof newIssuer>>): string {
  const part = (o: unknown): string => Buffer.from(JSON.stringify(o)).toString('base64url')
  const input = `${part({ alg: 'ES256', kid: issuer.kid, crit: ['x-ext'], 'x-ext': 1 })}.${part({ iss: 'https://idp.test', aud: 'api' })}`
  return `${input}.${sign('sha256', Buffer.from(input), { key: issuer.privateKey, dsaEncoding: 'ieee-p1363' }).toString('base64url')}`
}

t.test('the verifier: algorithms, claims, and reasons without the token', async (t) => {
  const issuers = await Promise.all((['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA'] as const).map(async (alg) => await newIssuer(alg)))
  const config = compileProvider({ Name: 'p', Issuer: 'https://idp.test', Audiences: ['api'], ClockSkewSeconds: 10, JSONWebKeySet: { Local: { JWKS: b64(jwks(...issuers)) } } }, 'x')
  const keys = newKeySet('p', config.keySet, silent, () => {})
  await keys.ready()
  const active = { config, keys }
  const now = Date.now()
  for (const issuer of issuers) t.match(await verifyToken(await issuer.sign(), active, now), { ok: true, payload: { sub: 'user-1' } }, issuer.alg)
  const es = issuers[6] as (typeof issuers)[number]
  const s = Math.floor(now / 1000)
  const reasons: Array<[string, string]> = [
    [await es.sign({ exp: s - 11 }), 'token expired'],
    [await es.sign({ nbf: s + 11 }), 'token not yet valid (nbf)'],
    [await es.sign({ aud: undefined }), 'aud is not among the provider\'s Audiences'],
    [await es.sign({ iss: undefined }), 'iss is not the provider\'s Issuer'],
    [await es.sign({ exp: 'soon' }), 'claim exp is invalid'],
    [await new SignJWT({ iss: 'https://idp.test', aud: 'api' }).setProtectedHeader({ alg: 'HS256' }).sign(new Uint8Array(32)), 'algorithm not allowed'],
    [await es.sign({}, { kid: 'unknown' }), 'no key of the key set matches the token'],
    ['a.b', 'malformed token'],
    [critToken(es), 'unsupported token (a crit header or key type jose does not handle)']
  ]
  for (const [token, reason] of reasons) t.same(await verifyToken(token, active, now), { ok: false, reason }, reason)
  t.match(await verifyToken(await es.sign({ exp: s - 9, nbf: s + 9 }), active, now), { ok: true, expMs: (s - 9) * 1000, nbfMs: (s + 9) * 1000 }, 'within the skew')
  t.match(await verifyToken(await es.sign({ exp: undefined }), active, now), { ok: true, expMs: null, nbfMs: null })
})

t.test('key selection as Envoy does it: several candidate keys are each tried; a key without kid fits any kid (docs/semantics.md#jwt-verification)', async (t) => {
  const [a, b, rsa] = await Promise.all([newIssuer('ES256'), newIssuer('ES256'), newIssuer('RS256')])
  const provider = async (keys: object[]): Promise<Parameters<typeof verifyToken>[1]> => {
    const config = compileProvider({ Name: 'p', Issuer: 'https://idp.test', JSONWebKeySet: { Local: { JWKS: b64({ keys }) } } }, 'x')
    const set = newKeySet('p', config.keySet, silent, () => {})
    await set.ready()
    return { config, keys: set }
  }
  const now = Date.now()
  const rotation = await provider([{ ...a.jwk, kid: 'k' }, { ...b.jwk, kid: 'k' }])
  t.match(await verifyToken(await b.sign({}, { kid: 'k' }), rotation, now), { ok: true }, 'two keys share a kid during a rotation: the second one verifies')
  t.match(await verifyToken(await a.sign({}, { kid: undefined }), rotation, now), { ok: true }, 'no kid: every key is a candidate')
  t.same(await verifyToken(await rsa.sign({}, { kid: undefined, alg: 'RS256' }), await provider([{ ...a.jwk, kid: undefined }, { ...b.jwk, kid: undefined }]), now),
    { ok: false, reason: 'no key of the key set matches the token' }, 'no candidate of the token\'s key type')
  const other = await newIssuer('ES256')
  t.same(await verifyToken(await other.sign({}, { kid: 'k' }), rotation, now), { ok: false, reason: 'bad signature' }, 'no candidate verifies it')
  const kidless = await provider([{ ...a.jwk, kid: undefined }, { ...rsa.jwk }])
  t.match(await verifyToken(await a.sign({}, { kid: 'anything' }), kidless, now), { ok: true }, 'a key without kid fits a token with any kid')
  t.same(await verifyToken(await other.sign({}, { kid: 'anything' }), kidless, now), { ok: false, reason: 'bad signature' })
  t.same(await verifyToken(await rsa.sign({}, { kid: undefined }), await provider([{ ...a.jwk, kid: undefined }]), now),
    { ok: false, reason: 'no key of the key set matches the token' }, 'nor a token of another key type without kid')
})

t.test('audiences compared as Envoy compares them: without http(s):// and a trailing slash', async (t) => {
  const issuer = await newIssuer('ES256')
  const active = async (audiences: string[]): Promise<Parameters<typeof verifyToken>[1]> => {
    const config = compileProvider({ Name: 'p', Issuer: 'https://idp.test', Audiences: audiences, JSONWebKeySet: { Local: { JWKS: b64(jwks(issuer)) } } }, 'x')
    const keys = newKeySet('p', config.keySet, silent, () => {})
    await keys.ready()
    return { config, keys }
  }
  const now = Date.now()
  const https = await active(['https://api.example.com'])
  for (const aud of ['https://api.example.com/', 'http://api.example.com', 'api.example.com', ['x', 'api.example.com/'], [7, 'https://api.example.com']]) {
    t.match(await verifyToken(await issuer.sign({ aud }), https, now), { ok: true }, JSON.stringify(aud))
  }
  for (const aud of ['https://api.example.com.evil', 'api.example', [7], undefined, 'https://API.example.com']) {
    t.same(await verifyToken(await issuer.sign({ aud }), https, now), { ok: false, reason: 'aud is not among the provider\'s Audiences' }, JSON.stringify(aud))
  }
  t.match(await verifyToken(await issuer.sign({ aud: 'https://api.example.com' }), await active(['api.example.com/']), now), { ok: true })
  t.match(await verifyToken(await issuer.sign({ aud: 'whatever' }), await active([]), now), { ok: true }, 'no Audiences: aud is not checked')
})

t.test('verified tokens are remembered per connection only while provably still valid', async (t) => {
  const issuer = await newIssuer('ES256')
  const entry = { Name: 'p', Issuer: 'https://idp.test', JSONWebKeySet: { Local: { JWKS: b64(jwks(issuer)) } } }
  const providers = new JwtProviders(silent, () => {})
  providers.update([entry])
  await providers.ready(['p'])
  const auth = new JwtAuthenticator(providers, silent)
  const connection = {}
  const now = Date.now()
  const s = Math.floor(now / 1000)
  const token = await issuer.sign({ exp: s + 60, nbf: s - 10 })
  const request = { rawHeaders: ['authorization', `Bearer ${token}`], url: '/', connection }
  const first = auth.tokensFor(request, ['p'], now)
  t.ok(first instanceof Promise, 'first sight: verified asynchronously')
  t.same((await first).payload('p')?.sub, 'user-1')
  const again = auth.tokensFor(request, ['p'], now + 1000)
  t.notOk(again instanceof Promise, 'then remembered for this connection')
  // Two tokens taking turns on one connection: each answer carries its own token's payload.
  const other = await issuer.sign({ exp: s + 60, nbf: s - 10, jti: 'other' })
  const otherRequest = { ...request, rawHeaders: ['authorization', `Bearer ${other}`] }
  const verifying = auth.tokensFor(otherRequest, ['p'], now)
  t.ok(verifying instanceof Promise, 'a second token is verified first')
  await verifying
  for (const [req, jti] of [[request, undefined], [otherRequest, 'other'], [request, undefined]] as const) {
    const answer = auth.tokensFor(req, ['p'], now)
    t.notOk(answer instanceof Promise, 'both stay remembered')
    t.equal((answer as Exclude<typeof answer, Promise<unknown>>).payload('p')?.jti, jti, 'with the payload of the token presented')
  }
  t.ok(auth.tokensFor({ ...request, connection: {} }, ['p'], now) instanceof Promise, 'not for another connection')
  t.ok(auth.tokensFor(request, ['p'], (s + 60 + 30) * 1000) instanceof Promise, 'expiry re-checked (with the skew): verified again')
  t.ok(auth.tokensFor(request, ['p'], (s - 10 - 31) * 1000) instanceof Promise, 'nbf re-checked')
  providers.update([{ ...entry, Audiences: ['x'] }])
  const changed = await auth.tokensFor(request, ['p'], now)
  t.equal(changed.payload('p'), null, 'a changed provider voids what was remembered')
  t.equal(changed.failures.p, 'aud is not among the provider\'s Audiences')
  providers.update([entry])
  await providers.ready(['p'])
  for (let i = 0; i < 20; i++) {
    await auth.tokensFor({ ...request, rawHeaders: ['authorization', `Bearer ${await issuer.sign({ jti: String(i) })}`] }, ['p'], now)
  }
  t.ok(auth.tokensFor(request, ['p'], now) instanceof Promise, 'a connection presenting many tokens starts over')
  auth.clear()
  const none = auth.tokensFor({ ...request, rawHeaders: [] }, ['p', 'q'], now)
  t.notOk(none instanceof Promise, 'nothing to verify: synchronous')
  t.same((none as Exclude<typeof none, Promise<unknown>>).failures, { p: 'no token in the request', q: 'no jwt-provider config entry of this name' })
})

t.test('a key set refreshed while a signature is checked: the token is checked again on the next request (docs/semantics.md#jwt-cache)', async (t) => {
  const issuer = await newIssuer('ES256')
  const config = compileProvider({ Name: 'p', Issuer: 'https://idp.test', JSONWebKeySet: { Local: { JWKS: b64(jwks(issuer)) } } }, 'x')
  const real = newKeySet('p', config.keySet, silent, () => {})
  await real.ready()
  // A refresh (the cache timer, or another request's unknown kid) lands after the key was picked,
  // before the check ends: the generation moves on, and with it, possibly, the key.
  let generation = 1
  const keys = Object.create(real, {
    generation: { get: () => generation },
    getKey: {
      value: async (...args: Parameters<typeof real.getKey>) => {
        const key = await real.getKey(...args)
        generation++
        return key
      }
    }
  }) as typeof real
  const active = { config, keys }
  const auth = new JwtAuthenticator({ get: () => active } as unknown as JwtProviders, silent)
  const request = { rawHeaders: ['authorization', `Bearer ${await issuer.sign()}`], url: '/', connection: {} }
  t.ok((await auth.tokensFor(request, ['p'], Date.now())).payload('p'), 'verified against the keys it began with')
  t.ok(auth.tokensFor(request, ['p'], Date.now()) instanceof Promise, 'not remembered under the newer generation: checked again')
})

t.test('remote key sets: status, size, trust, asynchronous first fetch, refetch on an unknown key', async (t) => {
  const issuer = await newIssuer('ES256')
  const agent = await startDevAgent()
  t.teardown(async () => await agent.close())
  const { certPem, privateKeyPem } = await agent.ca.issueCertificate({ dnsNames: ['localhost'] })
  let answer = (res: import('node:http').ServerResponse): void => { res.end(JSON.stringify(jwks(issuer))) }
  const server = https.createServer({ key: privateKeyPem, cert: certPem }, (_req, res) => answer(res))
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => { server.closeAllConnections(); server.close() })
  const uri = `https://localhost:${(server.address() as AddressInfo).port}/jwks`
  const ca = (await fetch(`${agent.address}/v1/agent/connect/ca/roots`).then(async (r) => await r.json()) as { Roots: Array<{ RootCert: string }> }).Roots[0]?.RootCert as string
  const dir = mkdtempSync(join(tmpdir(), 'ca-'))
  writeFileSync(join(dir, 'ca.pem'), ca)
  process.env.FCN_TEST_JWKS_CA = ca
  const source = (extra: Record<string, unknown>): Parameters<typeof newKeySet>[1] => ({
    kind: 'remote', uri, timeoutMs: 2000, cacheMs: 60_000, fetchAsynchronously: false, retries: 0, backoffBaseMs: 1, backoffMaxMs: 2, trustedCa: ca, ...extra
  } as Parameters<typeof newKeySet>[1])

  for (const trustedCa of [`file:${join(dir, 'ca.pem')}`, 'env:FCN_TEST_JWKS_CA']) {
    const set = newKeySet('p', source({ trustedCa }), silent, () => {})
    await set.ready()
    t.equal(set.error, null, trustedCa)
    set.stop()
  }
  const untrusted = newKeySet('p', source({ trustedCa: null }), silent, () => {})
  await untrusted.ready()
  t.match(untrusted.error, /^GET https:\/\/localhost:\d+\/jwks: /, 'the system CAs do not trust the test CA')
  untrusted.stop()

  answer = (res) => { res.statusCode = 503; res.end('down') }
  const failing = newKeySet('p', source({}), silent, () => {})
  await failing.ready()
  t.match(failing.error, /: status 503$/)
  failing.stop()
  answer = (res) => { res.end('x'.repeat(1.5 * 1024 * 1024)) }
  const huge = newKeySet('p', source({}), silent, () => {})
  await huge.ready()
  t.match(huge.error, /key set larger than 1 MiB/)
  huge.stop()

  // Stopped while its first fetch is in flight: the answer still lands, and nothing is scheduled after it.
  let hits = 0
  const arrived = new Promise<() => void>((resolve) => {
    answer = (res) => { hits++; resolve(() => { res.end(JSON.stringify(jwks(issuer))) }) }
  })
  const stopping = newKeySet('p', source({ cacheMs: 1 }), silent, () => {})
  const release = await arrived
  stopping.stop()
  release()
  await stopping.ready()
  t.equal(stopping.error, null, 'the answer in flight is installed')
  await new Promise((resolve) => setTimeout(resolve, 30))
  t.equal(hits, 1, 'no refresh after stop, however short the cache')

  answer = (res) => { res.end(JSON.stringify(jwks(issuer))) }
  const config = compileProvider({ Name: 'p', Issuer: 'https://idp.test', JSONWebKeySet: { Local: { JWKS: b64({ keys: [] }) } } }, 'x')
  const early = await issuer.sign()
  const events: KeySetEvent[] = []
  const lazy = newKeySet('p', source({ fetchAsynchronously: true }), silent, (e) => events.push(e))
  // FetchAsynchronously: readiness does not wait, and a request before the first answer finds no keys
  // (verification starts within microtasks; the fetch needs network round trips).
  const beforeFetch = verifyToken(early, { config, keys: lazy }, Date.now())
  await lazy.ready()
  t.same(await beforeFetch, { ok: false, reason: 'key set unavailable: key set not loaded yet' })
  lazy.stop()
  // A set whose server fails: a request fetches again (no cool-down with a zero cache), and fails
  // with the reason; once the server answers, the next request gets the keys.
  answer = (res) => { res.statusCode = 503; res.end() }
  const down = newKeySet('p', source({ cacheMs: 0, backoffMaxMs: 60_000 }), silent, () => {})
  await down.ready()
  t.match(await verifyToken(await issuer.sign(), { config, keys: down }, Date.now()), { ok: false, reason: /^key set unavailable: GET .*: status 503$/ })
  answer = (res) => { res.end(JSON.stringify(jwks(issuer))) }
  t.match(await verifyToken(await issuer.sign(), { config, keys: down }, Date.now()), { ok: true }, 'fetched on demand')
  const generation = down.generation
  await (down as unknown as { refresh: () => Promise<void> }).refresh()
  t.equal(down.generation, generation, 'the same document again: same generation, remembered tokens stay valid')
  down.stop()
  // With a cache shorter than the cool-down, an unknown kid fetches the set again at once.
  answer = (res) => { res.end(JSON.stringify({ keys: [] })) }
  const quick = newKeySet('p', source({ cacheMs: 1 }), silent, () => {})
  await quick.ready()
  answer = (res) => { res.end(JSON.stringify(jwks(issuer))) }
  // The cache (1 ms) must have run out since the first fetch started.
  await new Promise((resolve) => setTimeout(resolve, 5))
  t.match(await verifyToken(await issuer.sign(), { config, keys: quick }, Date.now()), { ok: true }, 'the rotated-in key is fetched on demand')
  quick.stop()
})
