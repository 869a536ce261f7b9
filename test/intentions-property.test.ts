// Property tests: on random intention sets and random requests, the compiled engine answers
// exactly as the slow reference transcription of docs/semantics.md#first-match (test/helpers/reference-engine.ts), reason
// strings included, for decide, decideOverride and decideSpellings.
import t from 'tap'
import fc from 'fast-check'
import type { Intention, IntentionHTTPHeaderPermission, IntentionHTTPPermission, IntentionJWTRequirement, IntentionPermission } from '../lib/agent/wire'
import type { JwtTokens } from '../lib/intentions/jwt'
import { type CallerIdentity, type PolicyInput, type RequestFacts, type RouteSource, compileOverride, compilePolicy, decide, decideOverride, decideSpellings } from '../lib/intentions/policy'
import { referenceDecide, referenceOverride, referenceRequest } from './helpers/reference-engine'

const RUNS = 2500
const PATHS = ['/', '/a', '/a/b', '/admin', '/ab', '/ADMIN', '/caf%C3%A9']

const opt = <T>(arb: fc.Arbitrary<T>): fc.Arbitrary<T | undefined> => fc.option(arb, { nil: undefined, freq: 2 })

const header: fc.Arbitrary<IntentionHTTPHeaderPermission> = fc.record({
  Name: fc.constantFrom('x-env', 'X-Env', 'host', ':authority', ':method', ':path', 'x-role'),
  kind: fc.constantFrom('Present', 'Exact', 'Prefix', 'Suffix', 'Contains', 'Regex'),
  value: fc.constantFrom('prod', 'PROD', 'a', 'ad', 'min', 'api.consul', 'GET', 'é'),
  regex: fc.constantFrom('prod', '(?i)prod', '[a-z,]+', '.*', 'a.*'),
  IgnoreCase: fc.boolean(),
  Invert: fc.boolean()
}).map(({ Name, kind, value, regex, IgnoreCase, Invert }) => {
  const h: IntentionHTTPHeaderPermission = { Name, Invert }
  if (kind === 'Present') h.Present = true
  else if (kind === 'Regex') h.Regex = regex
  else {
    h[kind as 'Exact'] = value
    h.IgnoreCase = IgnoreCase
  }
  return h
})

const http = (strict: boolean): fc.Arbitrary<IntentionHTTPPermission> => fc.record({
  path: fc.constantFrom('none', 'PathExact', 'PathPrefix', 'PathRegex'),
  exact: fc.constantFrom(...PATHS),
  prefix: fc.constantFrom('/', '/a', '/adm', '/caf'),
  regex: fc.constantFrom('/a.*', '/[ab]+', '(?i)/ADMIN', '.*', '/caf.*'),
  Methods: opt(fc.subarray(strict ? ['GET', 'post', 'PUT'] : ['GET', 'POST', 'get', 'PUT'], { minLength: 1 })),
  Header: opt(fc.array(header, { minLength: 1, maxLength: 2 }))
}).map(({ path, exact, prefix, regex, Methods, Header }) => {
  const h: IntentionHTTPPermission = {}
  if (path !== 'none') h[path as 'PathExact'] = path === 'PathExact' ? exact : path === 'PathPrefix' ? prefix : regex
  if (Methods !== undefined) h.Methods = Methods
  if (Header !== undefined) h.Header = Header
  // A route override must name at least one criterion; Consul's data may (in theory) name none.
  if (strict && path === 'none' && Methods === undefined && Header === undefined) h.PathPrefix = '/'
  return h
})

// JWT requirements (docs/semantics.md#jwt-match): providers as alternatives, claims (nested, array) all required.
const JWTS: IntentionJWTRequirement[] = [
  { Providers: [{ Name: 'okta' }] },
  { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: ['role'], Value: 'admin' }] }] },
  { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: ['org', 'team'], Value: 'a' }, { Path: ['role'], Value: 'admin' }] }, { Name: 'auth0' }] },
  { Providers: [{ Name: 'gone' }] }
]
const jwtRequirement = fc.constantFrom<IntentionJWTRequirement | undefined>(undefined, undefined, ...JWTS)

const permission = (_strict: boolean): fc.Arbitrary<IntentionPermission> => fc.record({
  Action: fc.constantFrom<'allow' | 'deny'>('allow', 'deny'),
  HTTP: http(_strict),
  jwt: jwtRequirement
}).map(({ Action, HTTP, jwt }) => (jwt !== undefined ? { Action, HTTP, JWT: jwt } : { Action, HTTP }))

/** Verified payloads a request may carry, by provider. */
const tokens: fc.Arbitrary<JwtTokens | null> = fc.option(fc.record({
  okta: fc.constantFrom(undefined, { role: 'admin' }, { role: ['user', 'admin'] }, { role: 'user', org: { team: 'a' } }, { role: 'admin', org: { team: 'a' } }),
  auth0: fc.constantFrom(undefined, { sub: 'x' })
}).map((verified): JwtTokens => ({
  payload: (name: string) => (verified as Record<string, Record<string, unknown> | undefined>)[name] ?? null
})), { nil: null })

const intention: fc.Arbitrary<Intention> = fc.record({
  SourceName: fc.constantFrom('web', 'api', 'db', '*'),
  SourceNS: fc.constantFrom('default', 'team-a', '*', ''),
  SourcePartition: opt(fc.constantFrom('', 'default', 'eu')),
  SourcePeer: fc.constantFrom(undefined, undefined, undefined, undefined, 'other'),
  SourceSamenessGroup: fc.constantFrom(undefined, undefined, undefined, undefined, 'sg'),
  DestinationName: fc.constantFrom('api', 'api', '*', 'billing'),
  DestinationNS: fc.constantFrom('default', 'default', '*', 'team-a'),
  DestinationPartition: fc.constantFrom(undefined, undefined, 'eu'),
  Precedence: fc.integer({ min: 1, max: 9 }),
  Action: fc.constantFrom<'allow' | 'deny'>('allow', 'deny'),
  Permissions: fc.option(fc.array(permission(false), { maxLength: 4 }), { nil: undefined }),
  jwt: jwtRequirement
}).map(({ jwt, Permissions, Action, ...rest }) => {
  const i: Intention = { ...rest, SourceType: 'consul', CreateIndex: 1, ModifyIndex: 1 }
  for (const k of ['SourcePartition', 'SourcePeer', 'SourceSamenessGroup', 'DestinationPartition'] as const) {
    if (i[k] === undefined) delete i[k]
  }
  if (Permissions !== undefined && Permissions.length > 0) i.Permissions = Permissions
  else i.Action = Action
  if (jwt !== undefined) i.JWT = jwt
  return i
})

const policyInput: fc.Arbitrary<PolicyInput> = fc.record({
  destination: fc.constantFrom('api', 'api', 'default/api', 'eu/default/api'),
  intentions: fc.array(intention, { maxLength: 10 }),
  defaultAllow: fc.boolean(),
  protocol: fc.constantFrom('http', 'http', 'grpc', 'http2', 'HTTP', 'tcp')
})

const caller: fc.Arbitrary<CallerIdentity> = fc.record({
  partition: fc.constantFrom('', 'default', 'eu'),
  namespace: fc.constantFrom('default', 'team-a', 'team-b', ''),
  service: fc.constantFrom('web', 'api', 'db', 'x')
})

const request: fc.Arbitrary<RequestFacts> = fc.record({
  method: fc.constantFrom('GET', 'POST', 'get', 'PUT'),
  path: fc.constantFrom(...PATHS),
  query: fc.constantFrom('', '?q=1'),
  rawHeaders: fc.array(fc.tuple(
    fc.constantFrom('x-env', 'X-ENV', 'Host', ':authority', 'x-role', 'X-Role'),
    fc.constantFrom('prod', 'PROD', 'a,b', 'admin', 'api.consul', '', Buffer.from('é').toString('latin1'))
  ), { maxLength: 4 }).map((pairs) => pairs.flat()),
  jwt: tokens
}).map(({ query, ...r }) => ({ ...r, url: r.path + query }))

const source: fc.Arbitrary<RouteSource> = fc.record({
  name: fc.constantFrom('web', 'db', '*'),
  namespace: fc.constantFrom(undefined, 'default', 'team-a', '*'),
  partition: fc.constantFrom(undefined, undefined, 'eu'),
  action: fc.constantFrom<'allow' | 'deny'>('allow', 'deny'),
  permissions: fc.option(fc.array(permission(true), { minLength: 1, maxLength: 3 }), { nil: undefined }),
  jwt: jwtRequirement
}).map(({ name, namespace, partition, action, permissions, jwt }) => {
  const s: RouteSource = { name: namespace === '*' ? '*' : name }
  if (jwt !== undefined) s.jwt = jwt
  if (namespace !== undefined) s.namespace = namespace
  if (partition !== undefined) s.partition = partition
  if (permissions !== undefined) s.permissions = permissions
  else s.action = action
  return s
})

const sources = fc.uniqueArray(source, {
  minLength: 1,
  maxLength: 4,
  selector: (s) => `${s.partition ?? 'default'}/${s.namespace ?? 'default'}/${s.name}`
})

t.test('decide equals the reference on random intention sets and requests', async (t) => {
  fc.assert(fc.property(policyInput, fc.array(fc.tuple(caller, request), { minLength: 1, maxLength: 6 }), (input, cases) => {
    const policy = compilePolicy(input)
    for (const [c, r] of cases) {
      const got = decide(policy, c, r)
      const want = referenceDecide(input, c, r)
      if (got.allow !== want.allow || got.reason !== want.reason) {
        throw new Error(`engine ${JSON.stringify(got)} reference ${JSON.stringify(want)}`)
      }
    }
  }), { numRuns: RUNS })
  t.pass(`${RUNS} random policies`)
})

t.test('decideOverride equals the reference, with and without a policy default', async (t) => {
  fc.assert(fc.property(sources, fc.option(fc.boolean(), { nil: null }), caller, request, (list, defaultAllow, c, r) => {
    const o = compileOverride(list)
    const policy = defaultAllow === null ? undefined : compilePolicy({ destination: 'api', intentions: [], defaultAllow, protocol: 'http' })
    const got = decideOverride(o, c, r, policy)
    const want = referenceOverride(list, c, r, defaultAllow)
    if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error(`engine ${JSON.stringify(got)} reference ${JSON.stringify(want)}`)
  }), { numRuns: RUNS })
  t.pass(`${RUNS} random overrides`)
})

t.test('decideSpellings equals the reference with overrides and alternate spellings', async (t) => {
  fc.assert(fc.property(policyInput, fc.option(sources, { nil: null }), caller, request, fc.subarray(PATHS, { maxLength: 3 }),
    (input, list, c, r, alternates) => {
      const got = decideSpellings(compilePolicy(input), list === null ? null : compileOverride(list), c, r, alternates)
      const want = referenceRequest(input, list, c, r, alternates)
      if (got.allow !== want.allow || got.reason !== want.reason) {
        throw new Error(`engine ${JSON.stringify(got)} reference ${JSON.stringify(want)}`)
      }
    }), { numRuns: RUNS })
  t.pass(`${RUNS} random requests`)
})
