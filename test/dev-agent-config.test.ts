// The dev agent's config entries: Consul's decoding, normalisation and validation of
// `PUT /v1/config` row by row (docs/semantics.md#config-entry-writes), the other kinds,
// CAS, deletes, and the intention match computation with its blocking behaviour.
import t from 'tap'
import type { Test } from 'tap'
import { request } from 'undici'
import { startDevAgent } from '../lib/dev-agent/index'
import type { DevAgent } from '../lib/dev-agent/index'
import { compareIntentions, decodeConfigEntry, goQuote, multiError } from '../lib/dev-agent/config-entries'
import type { Intention } from '../lib/agent/wire'

interface Res { status: number, text: string, json: any, headers: Record<string, string | string[] | undefined> }

async function call (agent: DevAgent, method: string, path: string, body?: unknown, raw?: string): Promise<Res> {
  const res = await request(`${agent.address}${path}`, {
    method: method as 'GET',
    body: raw ?? (body === undefined ? undefined : JSON.stringify(body))
  })
  const text = await res.body.text()
  let json: unknown
  try { json = JSON.parse(text) } catch {}
  return { status: res.statusCode, text, json, headers: res.headers }
}

async function agentFor (t: Test): Promise<DevAgent> {
  const agent = await startDevAgent()
  t.teardown(async () => await agent.close())
  return agent
}

const decodeFail = (message: string): string => `Bad request: Request decoding failed: ${message}`
const unknownKeys = (...keys: string[]): string => decodeFail(multiError(keys.map((k) => `invalid config key ${goQuote(k)}`)))
const ixn = (sources: unknown[], name = 'api'): Record<string, unknown> => ({ Kind: 'service-intentions', Name: name, Sources: sources })
const l7 = (http: unknown, action = 'allow'): Record<string, unknown> => ({ Name: 'web', Permissions: [{ Action: action, HTTP: http }] })
const hdr = (header: Record<string, unknown>): Record<string, unknown> => l7({ Header: [header] })
const P0 = 'Sources[0].Permissions[0].HTTP'
const ONE_OF = `${P0}.Header[0] should only contain one of Present, Exact, Prefix, Suffix, Contains, or Regex`
const IGNORE_CASE = `${P0}.Header[0] should set one of Exact, Prefix, Suffix, or Contains when using IgnoreCase`

const JWKS_B64 = Buffer.from('{"keys":[]}').toString('base64')
const provider = (extra: Record<string, unknown>): Record<string, unknown> => ({ Kind: 'jwt-provider', Name: 'okta', Issuer: 'https://okta', JSONWebKeySet: { Local: { JWKS: JWKS_B64 } }, ...extra })

function jwtProviderRows (): Array<[string, unknown, number, string?]> {
  const remote = (r: Record<string, unknown>): Record<string, unknown> => provider({ JSONWebKeySet: { Remote: { URI: 'https://idp/jwks', ...r } } })
  return [
    ['provider without name', { ...provider({}), Name: '' }, 500, 'Name is required'],
    ['provider with too much meta', provider({ Meta: Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, 'v'])) }), 500, multiError(['Meta exceeds maximum element count 64'])],
    ['provider without key set', provider({ JSONWebKeySet: null }), 500, 'JSONWebKeySet is required'],
    ['provider with both key sets', provider({ JSONWebKeySet: { Local: { JWKS: JWKS_B64 }, Remote: { URI: 'https://x' } } }), 500, 'must specify exactly one of Local or Remote JSON Web key set'],
    ['provider with an empty key set', provider({ JSONWebKeySet: {} }), 500, 'must specify exactly one of Local or Remote JSON Web key set'],
    ['local with both', provider({ JSONWebKeySet: { Local: { JWKS: JWKS_B64, Filename: '/x' } } }), 500, 'must specify exactly one of String or filename for local keyset'],
    ['local not base64', provider({ JSONWebKeySet: { Local: { JWKS: 'not base64!' } } }), 500, 'JWKS must be valid base64 encoded string'],
    ['remote without URI', remote({ URI: '' }), 500, 'Remote JWKS URI is required'],
    ['remote relative URI', remote({ URI: 'idp/jwks' }), 500, 'Remote JWKS URI is invalid: parse "idp/jwks": invalid URI for request, uri: idp/jwks'],
    ['remote backoff max below base', remote({ RetryPolicy: { NumRetries: 2, RetryPolicyBackOff: { BaseInterval: '2s', MaxInterval: '1s' } } }), 500,
      'retry policy backoff\'s MaxInterval should be greater or equal to BaseInterval'],
    ['remote bad duration', remote({ CacheDuration: 'soon' }), 400, decodeFail('1 error(s) decoding:\n\n* error decoding \'JSONWebKeySet.Remote.CacheDuration\': time: invalid duration "soon"')],
    ['remote map duration', remote({ CacheDuration: { a: 1 } }), 400, decodeFail('1 error(s) decoding:\n\n* \'JSONWebKeySet.Remote.CacheDuration\' expected type \'int64\', got unconvertible type \'map[string]interface {}\', value: \'map[a:1]\'')],
    ['remote bool duration (weakly typed: 1 ns)', remote({ CacheDuration: true }), 200],
    ['remote bool duration (weakly typed: 0 ns)', remote({ CacheDuration: false }), 200],
    ['remote cluster without TLS', remote({ URI: '/jwks', JWKSCluster: { DiscoveryType: 'STATIC', ConnectTimeout: '5s' } }), 200],
    ['remote bad discovery type', remote({ JWKSCluster: { DiscoveryType: 'DNS' } }), 500, 'unsupported jwks cluster discovery type: "DNS"'],
    ['remote TLS without CA', remote({ JWKSCluster: { TLSCertificates: {} } }), 500, 'must specify exactly one of: CaCertificateProviderInstance or TrustedCA for JKWS\' TLSCertificates'],
    ['remote trusted CA twice', remote({ JWKSCluster: { TLSCertificates: { TrustedCA: { Filename: '/a', InlineString: 'b' } } } }), 500,
      'must specify exactly one of: Filename, EnvironmentVariable, InlineString or InlineBytes for JWKS\' TrustedCA'],
    ['location with two kinds', provider({ Locations: [{ Header: { Name: 'a' }, Cookie: { Name: 'b' } }] }), 500, multiError(['must set exactly one of: JWT location header, query param or cookie'])],
    ['locations without names', provider({ Locations: [{ Header: {} }, { QueryParam: {} }, { Cookie: {} }] }), 500,
      multiError(['JWT location header name must be specified', 'JWT location query param name must be specified', 'JWT location cookie name must be specified'])],
    ['forwarding without header', provider({ Forwarding: {} }), 500, 'Header name required for forwarding config'],
    ['remote provider', remote({ RequestTimeoutMs: 500, cache_duration: '10m', RetryPolicy: { NumRetries: 3 }, JWKSCluster: { TLSCertificates: { TrustedCA: { InlineString: 'pem' } } } }), 200],
    ['local provider', provider({ Audiences: ['api'], Locations: [{ Header: { Name: 'x-token', ValuePrefix: 'T ', Forward: true } }, { QueryParam: { Name: 't' } }, { Cookie: { Name: 'c' } }], Forwarding: { HeaderName: 'x-payload' } }), 200]
  ]
}

t.test('PUT /v1/config validation table', async (t) => {
  const agent = await agentFor(t)
  for (const [name, protocol] of [['api', 'http'], ['h2', 'http2'], ['rpc', 'grpc'], ['web', 'tcp']]) {
    t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: name, Protocol: protocol })).text, 'true')
  }
  const longMeta = Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, 'v']))
  const rows: Array<[string, unknown, number, string?]> = [
    // Status codes and bare messages.
    ['duplicate source', ixn([{ Name: 'web', Action: 'allow' }, { Name: 'web', Action: 'allow' }]), 500, 'Sources[1] defines "web" more than once'],
    ['duplicate source, different action', ixn([{ Name: 'web', Action: 'allow' }, { Name: 'web', Action: 'deny' }]), 500, 'Sources[1] defines "web" more than once'],
    ['duplicate wildcard', ixn([{ Name: '*', Action: 'allow' }, { Name: '*', Action: 'deny' }]), 500, 'Sources[1] defines "*" more than once'],
    ['index after precedence sort', ixn([{ Name: '*', Action: 'allow' }, { Name: 'web', Action: 'x' }]), 500, 'Sources[0].Action must be set to \'allow\' or \'deny\''],
    ['upper-case action', ixn([{ Name: 'web', Action: 'ALLOW' }]), 500, 'Sources[0].Action must be set to \'allow\' or \'deny\''],
    ['missing action', ixn([{ Name: 'web' }]), 500, 'Sources[0].Action must be set to \'allow\' or \'deny\''],
    ['action with permissions', ixn([{ Name: 'web', Action: 'allow', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' } }] }]), 500, 'Sources[0].Action must be omitted if Permissions are specified'],
    ['empty permissions with action', ixn([{ Name: 'web', Action: 'allow', Permissions: [] }]), 200],
    ['partial wildcard source', ixn([{ Name: 'web*', Action: 'allow' }]), 500, 'Sources[0].Name: wildcard character \'*\' cannot be used with partial values'],
    ['partial wildcard source, leading', ixn([{ Name: '*web', Action: 'allow' }]), 500, 'Sources[0].Name: wildcard character \'*\' cannot be used with partial values'],
    ['partial wildcard entry', ixn([{ Name: 'web', Action: 'allow' }], 'api*'), 500, 'Name: wildcard character \'*\' cannot be used with partial values'],
    ['no sources', ixn([]), 500, 'At least one source is required'],
    ['missing sources', { Kind: 'service-intentions', Name: 'api' }, 500, 'At least one source is required'],
    ['sources from an empty object', { Kind: 'service-intentions', Name: 'api', Sources: {} }, 500, 'At least one source is required'],
    ['missing entry name', { Kind: 'service-intentions', Sources: [{ Name: 'web', Action: 'allow' }] }, 500, 'Name is required'],
    ['missing source name', ixn([{ Action: 'allow' }]), 500, 'Sources[0].Name is required'],
    ['null source', ixn([null]), 500, 'Sources[0].Name is required'],
    ['external-uri type', ixn([{ Name: 'web', Action: 'allow', Type: 'external-uri' }]), 500, 'Sources[0].Type must be set to \'consul\''],
    ['literal name with a slash', ixn([{ Name: 'web', Action: 'allow' }], 'default/api'), 200],
    ['sameness group', ixn([{ Name: 'web', Action: 'allow', SamenessGroup: 'g' }]), 500, 'Sources[0].SamenessGroup: Sameness groups are a Consul Enterprise feature. '],
    ['wildcard peer', ixn([{ Name: 'web', Action: 'allow', Peer: 'p*' }]), 500, 'Sources[0].Peer: cannot use wildcard \'*\' in peer'],
    ['peer source', ixn([{ Name: 'web', Action: 'allow', Peer: 'p1' }, { Name: 'web', Action: 'deny' }]), 200],
    ['duplicate peer source', ixn([{ Name: 'web', Action: 'allow', Peer: 'p1' }, { Name: 'web', Action: 'deny', Peer: 'p1' }]), 500, 'Sources[1] defines peer("p1") "web" more than once'],
    ['long description', ixn([{ Name: 'web', Action: 'allow', Description: 'd'.repeat(513) }]), 500, 'Sources[0].Description exceeds maximum length 512'],
    ['legacy meta', ixn([{ Name: 'web', Action: 'allow', LegacyMeta: { a: 'b' } }]), 500, 'Sources[0].LegacyMeta must be omitted'],
    ['legacy fields are cleared', ixn([{ Name: 'web', Action: 'allow', LegacyID: 'x', LegacyCreateTime: '2020-01-01T00:00:00Z', legacy_update_time: 'x' }]), 200],
    ['too much meta', { ...ixn([{ Name: 'web', Action: 'allow' }]), Meta: longMeta }, 500, multiError(['Meta exceeds maximum element count 64'])],
    ['long meta key and value', { ...ixn([{ Name: 'web', Action: 'allow' }]), Meta: { ['k'.repeat(129)]: 'v'.repeat(513) } }, 500,
      multiError([`Meta key "${'k'.repeat(129)}" exceeds maximum length 128`, `Meta value for key "${'k'.repeat(129)}" exceeds maximum length 512`])],
    // jwt-provider entries (Consul's JWTProviderConfigEntry.Validate), then intentions naming them.
    ...jwtProviderRows(),
    ['JWT naming a missing provider', { ...ixn([{ Name: 'web', Action: 'allow' }]), JWT: { Providers: [{ Name: 'zeta' }, { Name: 'alpha' }, { Name: 'okta' }] } }, 500,
      multiError(['Referenced JWT Provider does not exist. Provider Name: alpha', 'Referenced JWT Provider does not exist. Provider Name: zeta'])],
    ['permission JWT naming a missing provider', ixn([{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'nope' }] } }] }]), 500,
      multiError(['Referenced JWT Provider does not exist. Provider Name: nope'])],
    ['JWT provider without name', { ...ixn([{ Name: 'web', Action: 'allow' }]), JWT: { Providers: [{ VerifyClaims: [{ Path: ['a'], Value: 'b' }] }] } }, 500, multiError(['JWT provider name is required'])],
    ['permission JWT provider without name', ixn([{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{}] } }] }]), 500, multiError(['JWT provider name is required'])],
    ['JWT', { ...ixn([{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'okta' }] } }] }]), JWT: { Providers: [{ Name: 'okta', verify_claims: [{ Path: ['perms', 'role'], Value: 'admin' }] }] } }, 200],
    // Decoding problems are 400.
    ['namespace', { ...ixn([{ Name: 'web', Action: 'allow' }]), Namespace: 'default' }, 400, unknownKeys('Namespace')],
    ['source namespace', ixn([{ Name: 'web', Action: 'allow', Namespace: 'default' }]), 400, unknownKeys('Sources[0].Namespace')],
    ['unknown key', { ...ixn([{ Name: 'web', Action: 'allow' }]), Foo: 1 }, 400, unknownKeys('Foo')],
    ['unknown source key', ixn([{ Name: 'web', Action: 'allow', Bar: 1 }]), 400, unknownKeys('Sources[0].Bar')],
    ['unknown HTTP key', ixn([l7({ PathFoo: '/' })]), 400, unknownKeys(`${P0}.PathFoo`)],
    ['unknown keys, nested first', { ...ixn([{ Name: 'web', Action: 'allow', bar: 1 }]), Foo: 1 }, 400, unknownKeys('Sources[0].bar', 'Foo')],
    ['missing kind', { Name: 'api' }, 400, decodeFail('Payload does not contain a kind/Kind key at the top level')],
    ['upper-case KIND', { KIND: 'mesh' }, 400, decodeFail('Payload does not contain a kind/Kind key at the top level')],
    ['kind not a string', { Kind: 7 }, 400, decodeFail('Kind value in payload is not a string')],
    ['unknown kind', { Kind: 'foo' }, 400, decodeFail('invalid config entry kind: foo')],
    ['unsupported kind', { Kind: 'service-router', Name: 'api' }, 400, decodeFail('config entry kind "service-router" is not supported by the fastify-consul-native dev agent')],
    ['array body', [1], 400, decodeFail('json: cannot unmarshal array into Go value of type map[string]interface {}')],
    ['null body', null, 400, decodeFail('json: cannot unmarshal null into Go value of type map[string]interface {}')],
    ['string body', 'x', 400, decodeFail('json: cannot unmarshal string into Go value of type map[string]interface {}')],
    ['name of the wrong type', ixn([{ Name: {}, Action: 'allow' }]), 400,
      decodeFail('1 error(s) decoding:\n\n* \'Sources[0].Name\' expected type \'string\', got unconvertible type \'map[string]interface {}\', value: \'map[]\'')],
    ['two type errors, sorted', ixn([{ Name: [1, 2], Action: { b: [true, null], a: 1 } }]), 400,
      decodeFail('2 error(s) decoding:\n\n* \'Sources[0].Action\' expected type \'string\', got unconvertible type \'map[string]interface {}\', value: \'map[a:1 b:[true <nil>]]\'\n* \'Sources[0].Name\' expected type \'string\', got unconvertible type \'[]interface {}\', value: \'[1 2]\'')],
    ['bool from text', ixn([hdr({ Name: 'x', Present: 'maybe' })]), 400,
      decodeFail('1 error(s) decoding:\n\n* cannot parse \'Sources[0].Permissions[0].HTTP.Header[0].Present\' as bool: strconv.ParseBool: parsing "maybe": invalid syntax')],
    ['bool of the wrong type', ixn([hdr({ Name: 'x', Present: {} })]), 400,
      decodeFail('1 error(s) decoding:\n\n* \'Sources[0].Permissions[0].HTTP.Header[0].Present\' expected type \'bool\', got unconvertible type \'map[string]interface {}\', value: \'map[]\'')],
    ['int from text', ixn([{ Name: 'web', Action: 'allow', Precedence: 'abc' }]), 400,
      decodeFail('1 error(s) decoding:\n\n* cannot parse \'Sources[0].Precedence\' as int: strconv.ParseInt: parsing "abc": invalid syntax')],
    ['int of the wrong type', ixn([{ Name: 'web', Action: 'allow', Precedence: [1, 2] }]), 400,
      decodeFail('1 error(s) decoding:\n\n* \'Sources[0].Precedence\' expected type \'int\', got unconvertible type \'[]interface {}\', value: \'[1 2]\'')],
    ['uint from text', { ...ixn([{ Name: 'web', Action: 'allow' }]), Hash: 'x' }, 400,
      decodeFail('1 error(s) decoding:\n\n* cannot parse \'Hash\' as uint: strconv.ParseUint: parsing "x": invalid syntax')],
    ['negative uint', { ...ixn([{ Name: 'web', Action: 'allow' }]), Hash: -1 }, 400, decodeFail('1 error(s) decoding:\n\n* cannot parse \'Hash\', -1 overflows uint')],
    ['map of the wrong type', { ...ixn([{ Name: 'web', Action: 'allow' }]), Meta: 'x' }, 400, decodeFail('1 error(s) decoding:\n\n* \'Meta\' expected a map, got \'string\'')],
    ['struct from an empty list', { ...ixn([{ Name: 'web', Action: 'allow' }]), JWT: [] }, 400, decodeFail('1 error(s) decoding:\n\n* \'JWT\' expected a map, got \'slice\'')],
    ['list element of the wrong type', { ...ixn(['web']) }, 400, decodeFail('1 error(s) decoding:\n\n* \'Sources[0]\' expected a map, got \'string\'')],
    ['proxy config of the wrong type', { Kind: 'proxy-defaults', Config: 1 }, 400, decodeFail('1 error(s) decoding:\n\n* \'Config\' expected a map, got \'float64\'')],
    ['weakly typed values', { ...ixn([{ Name: ['web'], Action: 'allow', Precedence: true, Description: 5, Peer: false }]), Hash: '12', Meta: [{ n: 1, b: true }] }, 200],
    ['weakly typed booleans', ixn([hdr({ Name: 'x', Exact: 'a', Invert: 'true', Present: 'false' }), { Name: 'ops', Permissions: [{ Action: 'allow', HTTP: { Header: [{ Name: 'y', Present: 1, Invert: '' }] } }] }]), 200],
    ['weakly typed ints', ixn([{ Name: 'web', Action: 'allow', Precedence: false }, { Name: 'ops', Action: 'allow', Precedence: '' }]), 200],
    ['null meta value', { ...ixn([{ Name: 'web', Action: 'allow' }]), Meta: { a: null } }, 200],
    ['null method', ixn([l7({ Methods: [null] })]), 500, `${P0}.Methods contains an invalid method ""`],
    ['weakly typed numbers', ixn([{ Name: 'web', Action: 'allow', Precedence: 1.7, Description: true }]), 200],
    // Header matchers: exactly one, with '' and false counting as unset.
    ['header exact empty', ixn([hdr({ Name: 'x', Exact: '' })]), 500, ONE_OF],
    ['header present false', ixn([hdr({ Name: 'x', Present: false })]), 500, ONE_OF],
    ['header name only', ixn([hdr({ Name: 'x' })]), 500, ONE_OF],
    ['header invert only', ixn([hdr({ Name: 'x', Invert: true })]), 500, ONE_OF],
    ['header present and exact', ixn([hdr({ Name: 'x', Present: true, Exact: 'a' })]), 500, ONE_OF],
    ['header exact and prefix', ixn([hdr({ Name: 'x', Exact: 'a', Prefix: 'b' })]), 500, ONE_OF],
    ['header suffix and contains', ixn([hdr({ Name: 'x', Suffix: 'a', Contains: 'b' })]), 500, ONE_OF],
    ['header regex and suffix', ixn([hdr({ Name: 'x', Regex: 'a', Suffix: 'b' })]), 500, ONE_OF],
    ['header exact and invert', ixn([hdr({ Name: 'x', Exact: 'a', Invert: true })]), 200],
    ['header present and invert', ixn([hdr({ Name: 'x', Present: true, Invert: true })]), 200],
    ['header without name', ixn([hdr({ Exact: 'a' })]), 500, `${P0}.Header[0] missing required Name field`],
    ['header contains (1.20.1+)', ixn([hdr({ Name: 'x', Contains: 'a' })]), 200],
    ['header contains ignoring case', ixn([hdr({ Name: 'x', Contains: 'a', IgnoreCase: true })]), 200],
    ['header suffix ignoring case', ixn([hdr({ Name: 'Host', Suffix: 'bad.com', ignore_case: true })]), 200],
    ['ignore case with present', ixn([hdr({ Name: 'x', Present: true, IgnoreCase: true })]), 500, IGNORE_CASE],
    ['ignore case with regex', ixn([hdr({ Name: 'x', Regex: 'a', IgnoreCase: true })]), 500, IGNORE_CASE],
    // Paths.
    ['exact and prefix', ixn([l7({ PathExact: '/a', PathPrefix: '/b' })]), 500, `${P0} should only contain at most one of PathExact, PathPrefix, or PathRegex`],
    ['prefix and regex', ixn([l7({ PathPrefix: '/b', PathRegex: '/c' })]), 500, `${P0} should only contain at most one of PathExact, PathPrefix, or PathRegex`],
    ['exact without slash', ixn([l7({ PathExact: 'x' })]), 500, `${P0}.PathExact doesn't start with '/': "x"`],
    ['prefix without slash', ixn([l7({ PathPrefix: 'x"y' })]), 500, `${P0}.PathPrefix doesn't start with '/': "x\\"y"`],
    ['regex without slash', ixn([l7({ PathRegex: 'a.*' })]), 200],
    ['empty prefix', ixn([l7({ PathPrefix: '' })]), 500, `${P0} should not be empty`],
    ['empty methods', ixn([l7({ Methods: [] })]), 500, `${P0} should not be empty`],
    ['empty HTTP', ixn([l7({})]), 500, `${P0} should not be empty`],
    ['missing HTTP', ixn([{ Name: 'web', Permissions: [{ Action: 'allow' }] }]), 500, `${P0} is required`],
    ['permission action', ixn([l7({ PathPrefix: '/' }, 'ALLOW')]), 500, 'Sources[0].Permissions[0].Action must be set to \'allow\' or \'deny\''],
    ['methods only', ixn([l7({ Methods: ['GET'] })]), 200],
    ['header only', ixn([hdr({ Name: 'x', Prefix: 'a' })]), 200],
    ['unknown method', ixn([l7({ Methods: ['FOO'] })]), 500, `${P0}.Methods contains an invalid method "FOO"`],
    ['duplicate method after upper-casing', ixn([l7({ Methods: ['GET', 'get'] })]), 500, `${P0}.Methods contains "GET" more than once`],
    ['all nine methods', ixn([l7({ Methods: ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'CONNECT', 'OPTIONS', 'TRACE'] })]), 200],
    ['one method as a string', ixn([l7({ Methods: 'get' })]), 200],
    ['second permission', ixn([{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' } }, { Action: 'deny', HTTP: { PathExact: 'x' } }] }]), 500,
      'Sources[0].Permissions[1].HTTP.PathExact doesn\'t start with \'/\': "x"'],
    // Regexes are not checked at all.
    ...['(?=x)', '/a(', '(a)\\1', '(a{1000}){1000}', 'a{1001}', 'x'.repeat(100_000)].map((re): [string, unknown, number] =>
      [`regex ${re.slice(0, 20)}`, ixn([l7({ PathRegex: re }), { Name: 'ops', Permissions: [{ Action: 'deny', HTTP: { Header: [{ Name: 'x', Regex: re }] } }] }]), 200]),
    // Permissions versus protocol.
    ['permissions on a wildcard destination', ixn([l7({ PathPrefix: '/' })], '*'), 500, 'Sources[0].Permissions cannot be specified on intentions with wildcarded destinations'],
    ['permissions on tcp', ixn([l7({ PathPrefix: '/' })], 'web'), 500, 'service "web" has protocol "tcp", which is incompatible with L7 intentions permissions'],
    ['permissions without service-defaults', ixn([l7({ PathPrefix: '/' })], 'db'), 500, 'service "db" has protocol "tcp", which is incompatible with L7 intentions permissions'],
    ['permissions on http2', ixn([l7({ PathPrefix: '/' })], 'h2'), 200],
    ['permissions on grpc', ixn([l7({ PathPrefix: '/pkg.Svc/' })], 'rpc'), 200]
  ]
  for (const [name, body, status, message] of rows) {
    const res = await call(agent, 'PUT', '/v1/config', body)
    t.equal(res.status, status, `${name}: status`)
    if (status === 200) t.equal(res.text, 'true', `${name}: answers true`)
    else {
      t.equal(res.text, message, `${name}: message`)
      t.match(res.headers['content-type'], 'text/plain', `${name}: text body`)
    }
  }
  t.equal((await call(agent, 'PUT', '/v1/config', undefined, '{"Kind":')).text, decodeFail('unexpected EOF'), 'truncated JSON')
  t.equal((await call(agent, 'PUT', '/v1/config', undefined, '{x}')).text, decodeFail('invalid character \'x\' looking for beginning of value'), 'bad JSON')
  t.equal((await call(agent, 'PUT', '/v1/config', undefined, '')).text, decodeFail('EOF'), 'empty body')
})

t.test('normalisation on write and canonical storage', async (t) => {
  const agent = await agentFor(t)
  for (const name of ['okta', 'p']) await call(agent, 'PUT', '/v1/config', provider({ Name: name }))
  await call(agent, 'PUT', '/v1/config', { kind: 'service-defaults', name: 'api', protocol: 'HTTP', Meta: { team: 'a' } })
  const defaults = await call(agent, 'GET', '/v1/config/service-defaults/api')
  t.same(defaults.json, {
    Kind: 'service-defaults',
    Name: 'api',
    Protocol: 'http',
    TransparentProxy: {},
    MeshGateway: {},
    Expose: {},
    Meta: { team: 'a' },
    CreateIndex: defaults.json.CreateIndex,
    ModifyIndex: defaults.json.ModifyIndex
  }, 'lower-case keys, protocol lower-cased')
  t.equal(defaults.json.CreateIndex, defaults.json.ModifyIndex)

  const put = await call(agent, 'PUT', '/v1/config', {
    kind: 'service-intentions',
    name: 'api',
    Meta: { owner: 'x' },
    sources: [
      { name: '*', action: 'allow' },
      { name: 'Web', permissions: [{ action: 'allow', http: { path_prefix: '/v1/', methods: ['get', 'Post'], header: [{ name: 'X-Env', exact: 'prod', present: false }] } }], Precedence: 1, LegacyID: 'abc', Description: 'web app' },
      { Name: 'billing', Action: 'deny', Permissions: [] }
    ]
  })
  t.equal(put.text, 'true')
  const entry = await call(agent, 'GET', '/v1/config/service-intentions/api')
  t.same(entry.json, {
    Kind: 'service-intentions',
    Name: 'api',
    Sources: [
      {
        Name: 'Web',
        Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/v1/', Header: [{ Name: 'X-Env', Exact: 'prod' }], Methods: ['GET', 'POST'] } }],
        Precedence: 9,
        Type: 'consul',
        Description: 'web app'
      },
      { Name: 'billing', Action: 'deny', Precedence: 9, Type: 'consul' },
      { Name: '*', Action: 'allow', Precedence: 8, Type: 'consul' }
    ],
    Meta: { owner: 'x' },
    CreateIndex: entry.json.CreateIndex,
    ModifyIndex: entry.json.ModifyIndex
  }, 'canonical keys, sorted by precedence (stable), client precedence and LegacyID ignored')

  // A rewrite keeps CreateIndex and moves ModifyIndex.
  await call(agent, 'PUT', '/v1/config', ixn([{ Name: 'web', Action: 'deny', Peer: 'other', Description: 'peered' }, { Name: 'ops', Permissions: [{ Action: 'deny', HTTP: { Header: [{ Name: 'x', Present: true, Invert: true, Suffix: '' }, { Name: 'h', Contains: 'a', IgnoreCase: true, Invert: true }, { Name: 's', Suffix: '.x' }, { Name: 'r', Regex: '.*' }] }, JWT: { Providers: [{ Name: 'p', VerifyClaims: [{}] }] } }] }]))
  const second = await call(agent, 'GET', '/v1/config/service-intentions/api')
  t.equal(second.json.CreateIndex, entry.json.CreateIndex, 'CreateIndex kept')
  t.ok(second.json.ModifyIndex > entry.json.ModifyIndex, 'ModifyIndex moved')
  t.same(second.json.Sources, [
    { Name: 'web', Action: 'deny', Precedence: 9, Type: 'consul', Description: 'peered', Peer: 'other' },
    {
      Name: 'ops',
      Permissions: [{
        Action: 'deny',
        HTTP: { Header: [{ Name: 'x', Present: true, Invert: true }, { Name: 'h', Contains: 'a', Invert: true, IgnoreCase: true }, { Name: 's', Suffix: '.x' }, { Name: 'r', Regex: '.*' }] },
        JWT: { Providers: [{ Name: 'p', VerifyClaims: [{}] }] }
      }],
      Precedence: 9,
      Type: 'consul'
    }
  ])

  // Weak typing stores canonical values.
  await call(agent, 'PUT', '/v1/config', { ...ixn([{ Name: ['svc'], Action: 'allow', Description: 5 }, { Name: 7, Action: 'deny', Description: false }], 'weak'), Meta: [{ n: 1, b: true }], JWT: { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: 'a', Value: 1 }] }] } })
  const weak = (await call(agent, 'GET', '/v1/config/service-intentions/weak')).json
  t.same(weak.Sources.map((s: { Name: string, Description: string }) => [s.Name, s.Description]), [['svc', '5'], ['7', '0']])
  t.same(weak.Meta, { n: '1', b: '1' })
  t.same(weak.JWT, { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: ['a'], Value: '1' }] }] })
})

t.test('other kinds', async (t) => {
  const agent = await agentFor(t)
  // service-defaults: Protocol is not validated; `*` and an empty name are refused.
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'odd', Protocol: 'foo' })).text, 'true')
  t.same((await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: '*' })).text, 'service-defaults name must be the name of a service, and not a wildcard')
  t.same((await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults' })).text, 'Name is required')
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'm', Meta: { ['k'.repeat(200)]: 'v' } })).status, 500)
  await call(agent, 'PUT', '/v1/config', {
    Kind: 'service-defaults',
    Name: 'full',
    Protocol: 'grpc',
    Mode: 'transparent',
    transparent_proxy: { outbound_listener_port: 15001, DialedDirectly: true },
    MutualTLSMode: 'strict',
    mesh_gateway: { Mode: 'local' },
    Expose: { Checks: true, Paths: [{ listener_port: 21500, Path: '/health', LocalPathPort: 8080, Protocol: 'http' }] },
    ExternalSNI: 'x.example',
    UpstreamConfig: { Defaults: { ConnectTimeoutMs: 5 } },
    MaxInboundConnections: 10,
    BalanceInboundConnections: 'exact_balance',
    EnvoyExtensions: [{ Name: 'a' }, { Name: 'b' }]
  })
  const full = (await call(agent, 'GET', '/v1/config/service-defaults/full')).json
  t.same(full, {
    Kind: 'service-defaults',
    Name: 'full',
    Protocol: 'grpc',
    Mode: 'transparent',
    TransparentProxy: { OutboundListenerPort: 15001, DialedDirectly: true },
    MutualTLSMode: 'strict',
    MeshGateway: { Mode: 'local' },
    Expose: { Checks: true, Paths: [{ ListenerPort: 21500, Path: '/health', LocalPathPort: 8080, Protocol: 'http' }] },
    ExternalSNI: 'x.example',
    UpstreamConfig: { Defaults: { ConnectTimeoutMs: 5 } },
    MaxInboundConnections: 10,
    BalanceInboundConnections: 'exact_balance',
    EnvoyExtensions: [{ Name: 'a' }, { Name: 'b' }],
    CreateIndex: full.CreateIndex,
    ModifyIndex: full.ModifyIndex
  })

  // proxy-defaults: any name is stored as global.
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'proxy-defaults', Name: 'other', Config: { protocol: 'HTTP' }, Meta: { a: 'b' }, AccessLogs: { Enabled: true } })).text, 'true')
  t.equal((await call(agent, 'GET', '/v1/config/proxy-defaults/other')).status, 404)
  const proxy = (await call(agent, 'GET', '/v1/config/proxy-defaults/global')).json
  t.same(proxy, {
    Kind: 'proxy-defaults',
    Name: 'global',
    Config: { protocol: 'HTTP' },
    TransparentProxy: {},
    MeshGateway: {},
    Expose: {},
    AccessLogs: { Enabled: true },
    Meta: { a: 'b' },
    CreateIndex: proxy.CreateIndex,
    ModifyIndex: proxy.ModifyIndex
  })
  await call(agent, 'PUT', '/v1/config', { Kind: 'proxy-defaults' })
  t.same((await call(agent, 'GET', '/v1/config/proxy-defaults/global')).json.Config, null, 'no Config is null')

  // mesh: no Name key; the 1.20.1 request normalization block is accepted.
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'mesh', Name: 'mesh' })).text, unknownKeys('Name'))
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'mesh' })).text, 'true')
  const bare = (await call(agent, 'GET', '/v1/config/mesh/mesh')).json
  t.same(bare, { Kind: 'mesh', TransparentProxy: { MeshDestinationsOnly: false }, CreateIndex: bare.CreateIndex, ModifyIndex: bare.ModifyIndex })
  t.equal((await call(agent, 'PUT', '/v1/config', {
    kind: 'mesh',
    transparent_proxy: { mesh_destinations_only: true },
    AllowEnablingPermissiveMutualTLS: true,
    TLS: { Incoming: { TLSMinVersion: 'TLSv1_2', CipherSuites: ['A'] }, Outgoing: {} },
    http: { incoming: { request_normalization: { merge_slashes: true, path_with_escaped_slashes_action: 'UNESCAPE_AND_FORWARD', headers_with_underscores_action: 'REJECT_REQUEST' } } },
    Peering: { PeerThroughMeshGateways: true },
    Meta: { m: 'n' }
  })).text, 'true')
  const mesh = (await call(agent, 'GET', '/v1/config/mesh/mesh')).json
  t.same(mesh, {
    Kind: 'mesh',
    TransparentProxy: { MeshDestinationsOnly: true },
    AllowEnablingPermissiveMutualTLS: true,
    TLS: { Incoming: { TLSMinVersion: 'TLSv1_2', CipherSuites: ['A'] }, Outgoing: {} },
    // agent/structs has no omitempty on these four (api/ does): false and "" are sent.
    HTTP: { SanitizeXForwardedClientCert: false, Incoming: { RequestNormalization: { InsecureDisablePathNormalization: false, MergeSlashes: true, PathWithEscapedSlashesAction: 'UNESCAPE_AND_FORWARD', HeadersWithUnderscoresAction: 'REJECT_REQUEST' } } },
    Peering: { PeerThroughMeshGateways: true },
    Meta: { m: 'n' },
    CreateIndex: mesh.CreateIndex,
    ModifyIndex: mesh.ModifyIndex
  })
  await call(agent, 'PUT', '/v1/config', { Kind: 'mesh', HTTP: { Incoming: { RequestNormalization: {} } }, Peering: {} })
  const zero = (await call(agent, 'GET', '/v1/config/mesh/mesh')).json
  t.same(zero, {
    Kind: 'mesh',
    TransparentProxy: { MeshDestinationsOnly: false },
    HTTP: { SanitizeXForwardedClientCert: false, Incoming: { RequestNormalization: { InsecureDisablePathNormalization: false, MergeSlashes: false, PathWithEscapedSlashesAction: '', HeadersWithUnderscoresAction: '' } } },
    Peering: { PeerThroughMeshGateways: false },
    CreateIndex: zero.CreateIndex,
    ModifyIndex: zero.ModifyIndex
  }, 'empty settings are sent as their zero values')
  await call(agent, 'PUT', '/v1/config', { Kind: 'mesh', HTTP: { SanitizeXForwardedClientCert: true, Incoming: {} } })
  t.same((await call(agent, 'GET', '/v1/config/mesh/mesh')).json.HTTP, { SanitizeXForwardedClientCert: true, Incoming: {} })
  await call(agent, 'PUT', '/v1/config', { Kind: 'mesh', HTTP: {} })
  t.same((await call(agent, 'GET', '/v1/config/mesh/mesh')).json.HTTP, { SanitizeXForwardedClientCert: false })
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'mesh', HTTP: { Incoming: { RequestNormalization: { PathWithEscapedSlashesAction: 'NOPE' } } } })).text,
    'no matching PathWithEscapedSlashesAction value found for NOPE')
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'mesh', HTTP: { Incoming: { RequestNormalization: { HeadersWithUnderscoresAction: 'NOPE' } } } })).text,
    'no matching HeadersWithUnderscoresAction value found for NOPE')
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'mesh', Meta: { ['k'.repeat(129)]: 'v' } })).status, 500)
  t.equal((await call(agent, 'PUT', '/v1/config', { Kind: 'mesh', Sources: [] })).text, unknownKeys('Sources'))
})

t.test('L7 intentions and protocol changes', async (t) => {
  const agent = await agentFor(t)
  const protocol = async (kind: string, body: Record<string, unknown>): Promise<Res> => await call(agent, 'PUT', '/v1/config', { Kind: kind, ...body })
  const incompatible = (svc: string, proto: string): string => `service "${svc}" has protocol "${proto}", which is incompatible with L7 intentions permissions`

  // proxy-defaults global protocol http makes services without service-defaults L7-capable.
  t.equal((await call(agent, 'PUT', '/v1/config', ixn([l7({ PathPrefix: '/' })], 'other'))).text, incompatible('other', 'tcp'))
  t.equal((await protocol('proxy-defaults', { Name: 'global', Config: { protocol: 'HTTP' } })).text, 'true')
  t.equal((await call(agent, 'PUT', '/v1/config', ixn([l7({ PathPrefix: '/' })], 'other'))).text, 'true')
  t.equal((await protocol('service-defaults', { Name: 'api', Protocol: 'http' })).text, 'true')
  t.equal((await call(agent, 'PUT', '/v1/config', ixn([l7({ PathPrefix: '/' })], 'api'))).text, 'true')
  t.equal((await call(agent, 'PUT', '/v1/config', ixn([{ Name: 'web', Action: 'allow' }], 'plain'))).text, 'true', 'an L4 entry needs no protocol')
  t.equal((await call(agent, 'PUT', '/v1/config', ixn([{ Name: 'web', Action: 'allow' }], '*'))).text, 'true')

  // Switching to tcp while L7 intentions exist is refused, by service-defaults or proxy-defaults.
  t.equal((await protocol('service-defaults', { Name: 'api', Protocol: 'tcp' })).text, incompatible('api', 'tcp'))
  t.equal((await protocol('proxy-defaults', { Name: 'global', Config: { protocol: 'tcp' } })).text, incompatible('other', 'tcp'))
  t.equal((await protocol('proxy-defaults', { Name: 'global', Config: { protocol: 7 } })).text, incompatible('other', 'tcp'), 'a non-string protocol is tcp')
  t.equal((await call(agent, 'DELETE', '/v1/config/proxy-defaults/global')).text, incompatible('other', 'tcp'))
  // With proxy-defaults http, deleting api's service-defaults still leaves it HTTP.
  t.same((await call(agent, 'DELETE', '/v1/config/service-defaults/api')).json, {})
  t.same((await call(agent, 'GET', '/v1/config/service-defaults/api')).status, 404, 'delete allowed while proxy-defaults keeps http')
  await call(agent, 'DELETE', '/v1/config/service-intentions/other')
  t.equal((await protocol('service-defaults', { Name: 'api', Protocol: 'http' })).text, 'true')
  t.equal((await protocol('proxy-defaults', { Name: 'global', Config: {} })).text, 'true', 'api keeps http from its service-defaults')
  t.equal((await call(agent, 'DELETE', '/v1/config/service-defaults/api')).text, incompatible('api', 'tcp'))
  t.equal((await call(agent, 'GET', '/v1/config/service-defaults/api')).status, 200, 'the refused delete kept the entry')
})

t.test('CAS, deletes, reads and lists', async (t) => {
  const agent = await agentFor(t)
  const body = { Kind: 'service-defaults', Name: 'api', Protocol: 'http' }
  t.equal((await call(agent, 'PUT', '/v1/config?cas=0', body)).text, 'true', 'create if absent')
  t.equal((await call(agent, 'PUT', '/v1/config?cas=0', body)).text, 'false', 'cas=0 on an existing entry answers false')
  const index = (await call(agent, 'GET', '/v1/config/service-defaults/api')).json.ModifyIndex as number
  t.equal((await call(agent, 'PUT', `/v1/config?cas=${index + 100}`, body)).text, 'false')
  t.equal((await call(agent, 'PUT', `/v1/config?cas=${index}`, body)).text, 'true')
  t.equal((await call(agent, 'PUT', '/v1/config?cas=5', { Kind: 'service-defaults', Name: 'nope' })).text, 'false', 'cas on a missing entry')
  t.equal((await call(agent, 'PUT', '/v1/config?cas=', { Kind: 'service-defaults', Name: 'nocas' })).text, 'true', 'an empty cas is no cas')
  t.same(await call(agent, 'PUT', '/v1/config?cas=abc', body).then((r) => [r.status, r.text]), [500, 'strconv.ParseUint: parsing "abc": invalid syntax'])
  t.same(await call(agent, 'PUT', '/v1/config?cas=99999999999999999999', body).then((r) => [r.status, r.text]), [500, 'strconv.ParseUint: parsing "99999999999999999999": value out of range'])
  t.equal((await call(agent, 'PUT', '/v1/config?cas=-1', body)).status, 500)

  // Reads.
  const missing = await call(agent, 'GET', '/v1/config/service-defaults/nope')
  t.same([missing.status, missing.text], [404, 'Config entry not found for "service-defaults" / "nope"'])
  t.ok(Number(missing.headers['x-consul-index']) >= 1, 'a 404 still carries the index')
  t.same(await call(agent, 'GET', '/v1/config/bogus/x').then((r) => [r.status, r.text]), [500, 'invalid config entry kind: bogus'])
  t.same(await call(agent, 'GET', '/v1/config/bogus').then((r) => [r.status, r.text]), [500, 'invalid config entry kind: bogus'])
  t.equal((await call(agent, 'GET', '/v1/config/service-defaults/')).status, 404, 'an empty name is a missing entry')
  await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'b' })
  await call(agent, 'PUT', '/v1/config', ixn([{ Name: 'web', Action: 'allow' }], 'default/api'))
  t.same((await call(agent, 'GET', '/v1/config/service-defaults')).json.map((e: { Name: string }) => e.Name), ['api', 'b', 'nocas'], 'list sorted by name')
  t.same((await call(agent, 'GET', '/v1/config/service-intentions/default/api')).json.Name, 'default/api', 'a name with a slash')
  t.same((await call(agent, 'GET', '/v1/config/service-intentions/default%2Fapi')).json.Name, 'default/api', 'an escaped slash')
  t.same((await call(agent, 'GET', '/v1/config/')).json.map((e: { Kind: string }) => e.Kind), ['service-defaults', 'service-defaults', 'service-defaults', 'service-intentions'], 'all kinds')
  t.same((await call(agent, 'GET', '/v1/config/mesh')).json, [], 'an empty list')

  // Deletes.
  t.same(await call(agent, 'DELETE', '/v1/config/service-defaults/nope').then((r) => [r.status, r.json]), [200, {}], 'deleting a missing entry answers {}')
  t.same(await call(agent, 'DELETE', '/v1/config/service-defaults/b').then((r) => [r.status, r.json]), [200, {}])
  t.equal((await call(agent, 'GET', '/v1/config/service-defaults/b')).status, 404)
  const current = (await call(agent, 'GET', '/v1/config/service-defaults/api')).json.ModifyIndex as number
  t.same((await call(agent, 'DELETE', `/v1/config/service-defaults/api?cas=${current + 1}`)).json, false)
  t.same((await call(agent, 'DELETE', `/v1/config/service-defaults/api?cas=${current}`)).json, true)
  t.same((await call(agent, 'DELETE', '/v1/config/service-defaults/api?cas=1')).json, false, 'CAS delete of a missing entry')
  t.same((await call(agent, 'DELETE', '/v1/config/service-defaults/nocas?cas=')).json, {}, 'an empty cas is no cas')
  t.same(await call(agent, 'DELETE', '/v1/config/bogus/x').then((r) => [r.status, r.text]), [400, 'Bad request: invalid config entry kind: bogus'])
  t.same(await call(agent, 'DELETE', '/v1/config/service-defaults').then((r) => [r.status, r.text]), [404, 'Must provide both a kind and name to delete'])
  t.same(await call(agent, 'DELETE', '/v1/config/service-defaults/x?cas=z').then((r) => r.status), 500)
  await call(agent, 'PUT', '/v1/config', { Kind: 'proxy-defaults', Config: {} })
  await call(agent, 'PUT', '/v1/config', { Kind: 'mesh' })
  await call(agent, 'DELETE', '/v1/config/proxy-defaults/anything')
  await call(agent, 'DELETE', '/v1/config/mesh/anything')
  t.equal((await call(agent, 'GET', '/v1/config/proxy-defaults/global')).status, 404, 'proxy-defaults deletes are always of global')
  t.equal((await call(agent, 'GET', '/v1/config/mesh/mesh')).status, 404, 'mesh deletes are always of mesh')
})

t.test('blocking reads of config entries', async (t) => {
  const agent = await agentFor(t)
  await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'http' })
  const first = await call(agent, 'GET', '/v1/config/service-defaults/api')
  const index = Number(first.headers['x-consul-index'])

  // Another entry's change does not wake a query on this one.
  const started = Date.now()
  const pending = call(agent, 'GET', `/v1/config/service-defaults/api?index=${index}&wait=300ms`)
  await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'other' })
  const timedOut = await pending
  t.ok(Date.now() - started >= 280, 'waited for the timeout')
  t.equal(Number(timedOut.headers['x-consul-index']), index, 'same index at the timeout')

  // The other write moved the table index: a query with the old index answers at once.
  const behind = await call(agent, 'GET', `/v1/config/service-defaults/api?index=${index}&wait=5s`)
  const current = Number(behind.headers['x-consul-index'])
  t.ok(current > index, 'answered at once with the table index')
  const waiting = call(agent, 'GET', `/v1/config/service-defaults/api?index=${current}&wait=5s`)
  setTimeout(() => { call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'grpc' }).catch(() => {}) }, 50)
  const changed = await waiting
  t.equal(changed.json.Protocol, 'grpc', 'woken by the change')
  t.ok(Number(changed.headers['x-consul-index']) > current)

  // A missing entry can be watched until it appears; the index is the table's.
  const absent = await call(agent, 'GET', '/v1/config/service-intentions/api')
  const appear = call(agent, 'GET', `/v1/config/service-intentions/api?index=${absent.headers['x-consul-index'] as string}&wait=5s`)
  setTimeout(() => { call(agent, 'PUT', '/v1/config', ixn([{ Name: 'web', Action: 'allow' }])).catch(() => {}) }, 50)
  t.equal((await appear).status, 200)

  // Lists block on their kind; the list of all kinds on any entry.
  const listIndex = (await call(agent, 'GET', '/v1/config/mesh')).headers['x-consul-index'] as string
  const list = call(agent, 'GET', `/v1/config/mesh?index=${listIndex}&wait=5s`)
  const all = call(agent, 'GET', `/v1/config/?index=${listIndex}&wait=5s`)
  setTimeout(() => { call(agent, 'PUT', '/v1/config', { Kind: 'mesh' }).catch(() => {}) }, 50)
  t.equal((await list).json.length, 1)
  t.equal((await all).json.length, 4)
})

t.test('intention match', async (t) => {
  const agent = await agentFor(t)
  await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'http' })
  await call(agent, 'PUT', '/v1/config', ixn([
    { Name: '*', Action: 'allow' },
    { Name: 'web', Permissions: [{ Action: 'deny', HTTP: { PathPrefix: '/admin' } }] },
    { Name: 'billing', Action: 'deny', Description: 'no billing' }
  ]))
  await call(agent, 'PUT', '/v1/config', { ...ixn([{ Name: 'web', Action: 'deny' }, { Name: 'ops', Action: 'allow' }, { Name: 'web', Peer: 'p', Action: 'allow' }], '*'), Meta: { m: '1' } })
  await call(agent, 'PUT', '/v1/config', provider({}))
  await call(agent, 'PUT', '/v1/config', { ...ixn([{ Name: 'web', Action: 'allow' }], 'db'), JWT: { Providers: [{ Name: 'okta' }] } })

  const match = await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api&name=nothing/else&name=api')
  t.equal(match.status, 200)
  t.same(Object.keys(match.json), ['api', 'nothing/else'], 'keyed by the names as sent')
  t.same(match.json.api.map((i: Intention) => [i.SourceName, i.DestinationName, i.Precedence]), [
    ['billing', 'api', 9], ['web', 'api', 9], ['*', 'api', 8], ['ops', '*', 6], ['web', '*', 6], ['web', '*', 6]
  ], 'precedence, then source name')
  t.same(match.json.api[0], {
    Description: 'no billing',
    SourceNS: 'default',
    SourceName: 'billing',
    DestinationNS: 'default',
    DestinationName: 'api',
    SourceType: 'consul',
    Action: 'deny',
    Precedence: 9,
    CreateIndex: match.json.api[0].CreateIndex,
    ModifyIndex: match.json.api[0].ModifyIndex
  })
  t.notOk('Action' in match.json.api[1], 'an L7 intention has no Action')
  t.same(match.json.api[1].Permissions, [{ Action: 'deny', HTTP: { PathPrefix: '/admin' } }])
  t.same(match.json.api[3].Meta, { m: '1' }, 'the entry Meta is on each intention')
  t.equal(match.json.api[4].SourcePeer, undefined)
  t.equal(match.json.api[5].SourcePeer, 'p', 'peered sources are listed (the plugin must skip them)')
  t.same(match.json['nothing/else'].map((i: Intention) => i.DestinationName), ['*', '*', '*'], 'the namespace part has no effect in CE')
  t.same((await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=*')).json['*'].length, 3, 'the wildcard destination once')

  const bySource = await call(agent, 'GET', '/v1/connect/intentions/match?by=source&name=web')
  t.same(bySource.json.web.map((i: Intention) => `${i.SourceName}>${i.DestinationName}`), ['web>api', 'web>db', '*>api', 'web>*'], 'local sources web and *')
  t.same(bySource.json.web[1].JWT, { Providers: [{ Name: 'okta' }] }, 'the entry JWT is on each intention')
  t.same((await call(agent, 'GET', '/v1/connect/intentions/match?by=source&name=nobody')).json.nobody.length, 1)
  await call(agent, 'DELETE', '/v1/config/service-intentions/api')
  await call(agent, 'DELETE', '/v1/config/service-intentions/*')
  t.same((await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api')).json, { api: null }, 'no match is null')

  const errors: Array<[string, string]> = [
    ['', 'required query parameter \'by\' not set'],
    ['by=source&by=destination&name=a', 'required query parameter \'by\' not set'],
    ['by=both&name=a', '\'by\' parameter must be one of \'source\' or \'destination\''],
    ['by=destination', 'required query parameter \'name\' not set'],
    ['by=destination&name=peer:p/api', 'name "peer:p/api" is invalid: cannot specify a peer here'],
    ['by=destination&name=a/b/c/d', 'name "a/b/c/d" is invalid: input can contain at most two \'/\'']
  ]
  for (const [query, message] of errors) {
    const res = await call(agent, 'GET', `/v1/connect/intentions/match?${query}`)
    t.same([res.status, res.text], [500, message], query)
  }
  t.equal((await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=a/b/c')).status, 200, 'partition/namespace/name')
})

t.test('intention match blocks until the matched set changes', async (t) => {
  const agent = await agentFor(t)
  await call(agent, 'PUT', '/v1/config', ixn([{ Name: 'web', Action: 'allow' }]))
  const first = await call(agent, 'GET', '/v1/connect/intentions/match?by=destination&name=api')
  const index = Number(first.headers['x-consul-index'])
  t.same(first.headers['x-consul-effective-consistency'], 'leader')

  // Writes that do not change the matched set do not wake the query.
  const started = Date.now()
  const quiet = call(agent, 'GET', `/v1/connect/intentions/match?by=destination&name=api&index=${index}&wait=400ms`)
  await new Promise((resolve) => setTimeout(resolve, 30))
  await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'http' })
  await call(agent, 'PUT', '/v1/config', ixn([{ Name: 'x', Action: 'allow' }], 'other'))
  const timedOut = await quiet
  t.ok(Date.now() - started >= 380, 'not woken by unrelated writes')
  t.same(timedOut.json, first.json, 'same content at the timeout')

  // A query whose index is already behind answers at once.
  const behind = await call(agent, 'GET', `/v1/connect/intentions/match?by=destination&name=api&index=${index}&wait=5s`)
  t.ok(Number(behind.headers['x-consul-index']) > index, 'the index moved with the table')

  const next = Number(behind.headers['x-consul-index'])
  const woken = call(agent, 'GET', `/v1/connect/intentions/match?by=destination&name=api&index=${next}&wait=5s`)
  await new Promise((resolve) => setTimeout(resolve, 30))
  await call(agent, 'PUT', '/v1/config', ixn([{ Name: 'web', Action: 'deny' }]))
  const changed = await woken
  t.equal(changed.json.api[0].Action, 'deny', 'woken by the change of the matched set')
  t.ok(Date.now() - started < 4000)
})

t.test('helpers', async (t) => {
  t.equal(goQuote('a"b\\c\nd\te\rf\u0001\u007fé'), '"a\\"b\\\\c\\nd\\te\\rf\\x01\\x7fé"')
  t.equal(multiError(['a']), '1 error occurred:\n\t* a\n\n')
  t.equal(multiError(['a', 'b']), '2 errors occurred:\n\t* a\n\t* b\n\n')
  t.same(decodeConfigEntry({ kind: 'mesh', Kind: 'mesh' }), { kind: 'mesh', entry: {} }, 'Kind wins over kind')
  // mapstructure takes the exact key and leaves the other spelling unused.
  t.throws(() => decodeConfigEntry({ Kind: 'service-defaults', Name: 'a', name: 'b' }), { statusCode: 400, message: unknownKeys('name') })
  t.same(decodeConfigEntry({ Kind: 'service-defaults', Name: 'a', MeshGateway: { Mode: 'x' }, mesh_gateway: { Mode: 'y' } }).entry.MeshGateway, { Mode: 'x' }, 'the field wins over its alias')
  t.same(decodeConfigEntry({ Kind: 'service-defaults', Name: 'a', CreateIndex: 5, ModifyIndex: 6 }).entry, { Kind: 'service-defaults', Name: 'a' }, 'indexes are ignored')
  const base: Intention = { SourceNS: 'default', SourceName: 'a', DestinationNS: 'default', DestinationName: 'api', SourceType: 'consul', Precedence: 9, CreateIndex: 1, ModifyIndex: 1 }
  t.ok(compareIntentions({ ...base, Precedence: 9 }, { ...base, Precedence: 8 }) < 0)
  t.ok(compareIntentions({ ...base, SourceName: '*' }, base) < 0, '`*` sorts before letters')
  t.ok(compareIntentions({ ...base, SourcePeer: 'p' }, base) > 0)
  t.ok(compareIntentions({ ...base, SourceName: 'é' }, { ...base, SourceName: 'z' }) > 0, 'byte-wise')
  t.equal(compareIntentions(base, { ...base }), 0)
})

t.test('jwt-provider entries: Consul defaults, rendering, listing, ACLs and deletes', async (t) => {
  const agent = await agentFor(t)
  t.equal((await call(agent, 'PUT', '/v1/config', provider({
    JSONWebKeySet: undefined,
    json_web_key_set: { remote: { uri: 'https://idp/jwks', fetch_asynchronously: true, cache_duration: '90s', retry_policy: { retry_policy_back_off: { base_interval: 500000000 } } } },
    forwarding: { header_name: 'x-payload', pad_forward_payload_header: true },
    Meta: {}
  }))).text, 'true')
  const entry = await call(agent, 'GET', '/v1/config/jwt-provider/okta')
  t.same(entry.json, {
    Kind: 'jwt-provider',
    Name: 'okta',
    JSONWebKeySet: { Remote: { URI: 'https://idp/jwks', CacheDuration: 90_000_000_000, FetchAsynchronously: true, RetryPolicy: { RetryPolicyBackOff: { BaseInterval: 500_000_000 } } } },
    Issuer: 'https://okta',
    Forwarding: { HeaderName: 'x-payload', PadForwardPayloadHeader: true },
    ClockSkewSeconds: 30,
    CreateIndex: entry.json.CreateIndex,
    ModifyIndex: entry.json.ModifyIndex
  }, 'durations in nanoseconds, ClockSkewSeconds defaulted to 30, empty fields omitted')
  await call(agent, 'PUT', '/v1/config', provider({ Name: 'auth0', ClockSkewSeconds: 5, Locations: [{ Cookie: { Name: 'c' } }] }))
  const listed = await call(agent, 'GET', '/v1/config/jwt-provider')
  t.same(listed.json.map((e: { Name: string }) => e.Name), ['auth0', 'okta'])
  t.same(listed.json[0].Locations, [{ Cookie: { Name: 'c' } }])
  t.equal(listed.json[0].ClockSkewSeconds, 5)
  // Intentions may name both; deleting a provider still referenced is allowed, as in Consul.
  // authorize ignores JWT: an L4 intention decides by its action, an L7 one denies.
  await call(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'http' })
  await call(agent, 'PUT', '/v1/config', { ...ixn([{ Name: 'web', Action: 'allow' }, { Name: 'ops', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'okta' }] } }] }]), JWT: { Providers: [{ Name: 'okta' }, { Name: 'auth0' }] } })
  const uri = (svc: string): string => `spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/${svc}`
  t.equal((await call(agent, 'POST', '/v1/agent/connect/authorize', { Target: 'api', ClientCertURI: uri('web') })).json.Authorized, true)
  t.equal((await call(agent, 'POST', '/v1/agent/connect/authorize', { Target: 'api', ClientCertURI: uri('ops') })).json.Authorized, false)
  t.same((await call(agent, 'DELETE', '/v1/config/jwt-provider/okta')).json, {})
  t.equal((await call(agent, 'GET', '/v1/config/jwt-provider/okta')).status, 404)
  t.equal((await call(agent, 'GET', '/v1/config/service-intentions/api')).status, 200)
})

t.test('jwt-provider ACLs: mesh:write to write; a service token may read them', async (t) => {
  const agent = await startDevAgent({ acl: { enabled: true, defaultPolicy: 'deny', tokens: { svc: 'write', root: 'manage' } } })
  t.teardown(async () => await agent.close())
  const as = async (token: string, method: string, path: string, body?: unknown): Promise<Res> => {
    const res = await request(`${agent.address}${path}`, { method: method as 'GET', headers: { 'x-consul-token': token }, body: body === undefined ? undefined : JSON.stringify(body) })
    const text = await res.body.text()
    let json: unknown
    try { json = JSON.parse(text) } catch {}
    return { status: res.statusCode, text, json, headers: res.headers }
  }
  t.equal((await as('svc', 'PUT', '/v1/config', provider({}))).status, 403)
  t.equal((await as('root', 'PUT', '/v1/config', provider({}))).status, 200)
  t.equal((await as('svc', 'GET', '/v1/config/jwt-provider/okta')).status, 200)
  t.same((await as('svc', 'GET', '/v1/config/jwt-provider')).json.map((e: { Name: string }) => e.Name), ['okta'])
  t.equal((await as('svc', 'DELETE', '/v1/config/jwt-provider/okta')).status, 403)
})
