// The decision engine, rule by rule: compilePolicy/decide (docs/semantics.md#decision-rules, docs/semantics.md#request-rules), route overrides,
// decideSpellings with router spellings, and what each refuses to compile.
import t, { type Test } from 'tap'
import type { Intention, IntentionPermission } from '../lib/agent/wire'
import { ixn } from './helpers/intentions'
import { InvalidIntentionsError } from '../lib/errors'
import { HeaderMatcher, type HeaderMatchKind, type HeaderSource, type PathMatchKind, PermissionMatcher, asciiLower, headerValue } from '../lib/intentions/matchers'
import { headerAmbiguity, singleValued } from '../lib/intentions/headers'
import {
  type CallerIdentity, type CompiledOverride, type CompiledPolicy, type Decision, type PolicyInput, type RequestFacts, type RouteSource,
  RuleError, compareBytes, comparePrecedence, compileOverride, compilePolicy, decide, decideOverride, decideSpellings
} from '../lib/intentions/policy'

const allow = (HTTP: IntentionPermission['HTTP'], extra: Partial<IntentionPermission> = {}): IntentionPermission => ({ Action: 'allow', HTTP, ...extra })
const deny = (HTTP: IntentionPermission['HTTP'], extra: Partial<IntentionPermission> = {}): IntentionPermission => ({ Action: 'deny', HTTP, ...extra })

function policy (intentions: Intention[], defaultAllow = false, protocol = 'http', destination = 'api'): CompiledPolicy {
  return compilePolicy({ destination, intentions, defaultAllow, protocol })
}

function who (service: string, namespace = 'default', partition = ''): CallerIdentity {
  return { partition, namespace, service }
}

function req (path = '/', method = 'GET', rawHeaders: string[] = [], url = path): RequestFacts {
  return { method, path, url, rawHeaders }
}

const WEB = who('web')

t.test('choosing the intention (docs/semantics.md#first-match)', async (t) => {
  t.test('the first intention in precedence order whose source matches decides, whatever the transport order', async (t) => {
    const p = policy([ixn('web', '*', 6, 'deny'), ixn('*', 'api', 8, 'allow'), ixn('web', 'api', 9, 'deny')])
    t.same(decide(p, WEB, req()), { allow: false, reason: 'intention default/web => default/api (precedence 9) deny' })
    t.same(decide(p, who('cron'), req()), { allow: true, reason: 'intention default/* => default/api (precedence 8) allow' })
  })

  t.test('equal precedence is ordered byte-wise by source, so "*" sorts before names', async (t) => {
    // Both 6 (destination *), same source partition: SourceName decides the order: "*" < "web".
    const p = policy([ixn('web', '*', 6, 'allow', { DestinationName: '*' }), ixn('*', '*', 6, 'deny')])
    t.equal(decide(p, WEB, req()).reason, 'intention default/* => default/* (precedence 6) deny')
  })

  t.test('a caller no intention names falls to the default policy', async (t) => {
    t.same(decide(policy([ixn('web', 'api', 9, 'allow')]), who('db'), req()), { allow: false, reason: 'default policy (deny)' })
    t.same(decide(policy([ixn('web', 'api', 9, 'deny')], true), who('db'), req()), { allow: true, reason: 'default policy (allow)' })
    t.same(decide(policy([]), WEB, req()), { allow: false, reason: 'default policy (deny)' })
  })

  t.test('the four source patterns ns/name, ns/*, */name, */* compete by position, not by shape', async (t) => {
    const p = policy([
      ixn('*/*', 'api', 7, 'deny'), ixn('team-a/*', 'api', 8, 'allow'),
      // '*/web' is not writable in Consul but is matched like any other pattern.
      ixn('*/web', 'api', 8, 'deny', { SourceNS: '*' }), ixn('team-a/web', 'api', 9, 'allow')
    ])
    t.equal(decide(p, who('web', 'team-a'), req()).reason, 'intention team-a/web => default/api (precedence 9) allow')
    t.equal(decide(p, who('db', 'team-a'), req()).reason, 'intention team-a/* => default/api (precedence 8) allow')
    t.equal(decide(p, who('web', 'team-b'), req()).reason, 'intention */web => default/api (precedence 8) deny')
    t.equal(decide(p, who('db', 'team-b'), req()).reason, 'intention */* => default/api (precedence 7) deny')
  })

  t.test('a namespace wildcard can win over an exact namespace when it sorts first', async (t) => {
    const p = policy([ixn('team-a/web', 'api', 5, 'allow'), ixn('*/*', 'api', 7, 'deny')])
    t.equal(decide(p, who('web', 'team-a'), req()).allow, false)
  })

  t.test('partitions must be equal, "" meaning default, on both sides (docs/semantics.md#source-matching)', async (t) => {
    const p = policy([
      ixn('web', 'api', 9, 'allow'),
      ixn('web', 'api', 9, 'deny', { SourcePartition: 'eu' })
    ])
    t.equal(decide(p, who('web', 'default', ''), req()).allow, true)
    t.equal(decide(p, who('web', 'default', 'default'), req()).allow, true)
    t.same(decide(p, who('web', 'default', 'eu'), req()), { allow: false, reason: 'intention eu/default/web => default/api (precedence 9) deny' })
    t.equal(decide(p, who('web', 'default', 'us'), req()).reason, 'default policy (deny)')
  })

  t.test('an empty caller namespace means default, and an empty SourceNS too', async (t) => {
    const p = policy([ixn('web', 'api', 9, 'allow', { SourceNS: '' })])
    t.equal(decide(p, who('web', ''), req()).allow, true)
  })

  t.test('names are compared case-sensitively', async (t) => {
    t.equal(decide(policy([ixn('Web', 'api', 9, 'allow')]), WEB, req()).allow, false)
  })

  t.test('a caller named "*" only matches wildcard sources', async (t) => {
    const p = policy([ixn('web', 'api', 9, 'allow'), ixn('*', 'api', 8, 'deny')])
    t.equal(decide(p, who('*'), req()).reason, 'intention default/* => default/api (precedence 8) deny')
  })

  t.test('decisions do not depend on the identity object: a mutated caller object is re-read', async (t) => {
    const p = policy([ixn('web', 'api', 9, 'allow')])
    const caller = { partition: '', namespace: 'default', service: 'web' }
    t.equal(decide(p, caller, req()).allow, true)
    caller.service = 'db'
    t.equal(decide(p, caller, req()).allow, false)
  })

  t.test('L7 decides with its first matching permission; no match means the default, never a lower intention', async (t) => {
    const list = [ixn('*', 'api', 8, 'allow'), ixn('web', 'api', 9, [deny({ PathPrefix: '/admin' }), allow({ PathPrefix: '/v1/' })])]
    const p = policy(list)
    t.same(decide(p, WEB, req('/admin/x')), { allow: false, reason: 'intention default/web => default/api (precedence 9), permission 1 (deny)' })
    t.same(decide(p, WEB, req('/v1/x')), { allow: true, reason: 'intention default/web => default/api (precedence 9), permission 2 (allow)' })
    t.same(decide(p, WEB, req('/other')), { allow: false, reason: 'intention default/web => default/api (precedence 9): no permission matched, default policy (deny)' })
    t.same(decide(policy(list, true), WEB, req('/other')), { allow: true, reason: 'intention default/web => default/api (precedence 9): no permission matched, default policy (allow)' })
  })

  t.test('L7 intentions on a protocol that is not HTTP-like deny every request from their source (T33)', async (t) => {
    const list = [ixn('web', 'api', 9, [allow({ PathPrefix: '/' })]), ixn('db', 'api', 9, 'allow')]
    for (const protocol of ['tcp', '']) {
      const p = policy(list, true, protocol)
      t.same(decide(p, WEB, req()), { allow: false, reason: `intention default/web => default/api (precedence 9) has L7 permissions but protocol ${JSON.stringify(protocol)} is not HTTP-like (deny)` })
      t.equal(decide(p, who('db'), req()).allow, true, 'L4 intentions still apply')
      t.match(p.warnings, [/1 intention\(s\) have L7 permissions but the service protocol .* is not HTTP-like/])
    }
    for (const protocol of ['http', 'http2', 'grpc', 'HTTP']) t.equal(decide(policy(list, false, protocol), WEB, req()).allow, true, protocol)
  })

  t.test('Permissions: [] with an Action is a plain L4 intention, as Consul stores it', async (t) => {
    t.equal(decide(policy([ixn('web', 'api', 9, 'allow', { Permissions: [] })]), WEB, req()).reason,
      'intention default/web => default/api (precedence 9) allow')
  })

  t.test('non-empty Permissions make an intention L7 even if an Action is also present', async (t) => {
    const p = policy([ixn('web', 'api', 9, [deny({ PathPrefix: '/' })], { Action: 'allow' })])
    t.equal(decide(p, WEB, req()).allow, false)
  })
})

t.test('what the policy keeps (docs/semantics.md#datacenter, docs/semantics.md#peers, destinations)', async (t) => {
  t.test('peered and sameness-group sources never match and are reported once per cause', async (t) => {
    const p = policy([
      ixn('web', 'api', 9, 'allow', { SourcePeer: 'other' }), ixn('db', 'api', 9, 'allow', { SourcePeer: 'other' }),
      ixn('web', 'api', 9, 'allow', { SourceSamenessGroup: 'sg' }),
      ixn('web', 'api', 9, 'allow', { SourcePeer: '', SourceSamenessGroup: '' })
    ])
    t.equal(p.size, 1)
    t.same(p.warnings, [
      '2 intention(s) with a peered source (SourcePeer) ignored: cluster peering is not supported, they never match',
      '1 intention(s) with a sameness-group source ignored: sameness groups are not supported, they never match'
    ])
    t.ok(Object.isFrozen(p.warnings))
  })

  t.test('intentions for another destination are ignored; "*" destinations are kept', async (t) => {
    const p = policy([ixn('web', 'billing', 9, 'allow'), ixn('web', '*', 6, 'allow')])
    t.equal(p.size, 1)
    t.same(p.warnings, ['1 intention(s) for another destination ignored'])
    t.equal(decide(p, WEB, req()).reason, 'intention default/web => default/* (precedence 6) allow')
  })

  t.test('the destination is compared without regard to ASCII case, as Consul looks config entries up', async (t) => {
    // Consul answers the match for service `Api` with the entry it stores as `api`.
    const p = policy([ixn('web', 'api', 9, 'deny'), ixn('web', 'billing', 9, 'allow')], true, 'http', 'Api')
    t.equal(p.size, 1)
    t.equal(decide(p, WEB, req()).allow, false, 'the deny applies: not dropped as another destination\'s')
    const scoped = policy([ixn('web', 'api', 9, 'deny', { DestinationNS: 'Team-A', DestinationPartition: 'EU' })], true, 'http', 'eu/team-a/API')
    t.equal(scoped.size, 1)
  })

  t.test('a destination written ns/name or partition/ns/name also filters namespace and partition', async (t) => {
    const list = [
      ixn('a', 'api', 9, 'allow'),
      ixn('b', 'api', 9, 'allow', { DestinationNS: 'team-a' }),
      ixn('c', 'api', 9, 'allow', { DestinationNS: '*' }),
      ixn('d', 'api', 9, 'allow', { DestinationPartition: 'eu' })
    ]
    t.equal(policy(list, false, 'http', 'api').size, 4)
    t.equal(policy(list, false, 'http', 'team-a/api').size, 2)
    t.equal(policy(list, false, 'http', 'default/api').size, 3)
    t.equal(policy(list, false, 'http', 'eu/default/api').size, 1)
    t.equal(policy(list, false, 'http', 'default/default/api').size, 2)
  })

  t.test('the datacenter is not part of a caller identity (docs/semantics.md#datacenter, T43)', async (t) => {
    t.equal(decide(policy([ixn('web', 'api', 9, 'allow')]), { ...WEB, datacenter: 'dc2' } as unknown as CallerIdentity, req()).allow, true)
  })
})

t.test('L7 matching', async (t) => {
  const one = (perm: IntentionPermission, defaultAllow = false): CompiledPolicy => policy([ixn('web', 'api', 9, [perm])], defaultAllow)
  const allowed = (p: CompiledPolicy, r: RequestFacts): boolean => decide(p, WEB, r).allow

  t.test('methods are an exact, case-sensitive list', async (t) => {
    const p = one(allow({ Methods: ['GET', 'POST'] }))
    t.equal(allowed(p, req('/', 'POST')), true)
    t.equal(allowed(p, req('/', 'PUT')), false)
    t.equal(allowed(p, req('/', 'post')), false)
  })

  t.test('PathExact is equality, PathPrefix a raw prefix, PathRegex a whole-string RE2 match', async (t) => {
    t.equal(allowed(one(allow({ PathExact: '/a' })), req('/a')), true)
    t.equal(allowed(one(allow({ PathExact: '/a' })), req('/a/')), false)
    t.equal(allowed(one(allow({ PathPrefix: '/a' })), req('/ab')), true)
    t.equal(allowed(one(allow({ PathPrefix: '/a' })), req('/b')), false)
    t.equal(allowed(one(allow({ PathRegex: '/a+' })), req('/aaa')), true)
    t.equal(allowed(one(allow({ PathRegex: '/a+' })), req('/aab')), false)
    t.equal(allowed(one(allow({ PathRegex: '(?i)/ADMIN' })), req('/admin')), true, 'RE2 inline flags')
    t.equal(allowed(one(allow({ PathRegex: 'a|ab' })), req('ab')), true, 'alternation is anchored as a whole')
  })

  t.test('an empty string counts as an absent path matcher, as in Consul', async (t) => {
    t.equal(allowed(one(allow({ PathPrefix: '', Methods: ['GET'] })), req('/x')), true)
  })

  t.test('a permission with no HTTP block (never sent by Consul) matches any request, as Envoy would', async (t) => {
    t.equal(allowed(one({ Action: 'allow' } as IntentionPermission), req('/x')), true)
    t.equal(allowed(one({ Action: 'deny', HTTP: {} }, true), req('/x')), false)
  })

  t.test('headers: names ignore case, values do not unless IgnoreCase', async (t) => {
    const exact = one(allow({ Header: [{ Name: 'X-Env', Exact: 'prod' }] }))
    t.equal(allowed(exact, req('/', 'GET', ['x-ENV', 'prod'])), true)
    t.equal(allowed(exact, req('/', 'GET', ['x-env', 'Prod'])), false)
    t.equal(allowed(exact, req('/', 'GET', ['x-envy', 'prod'])), false)
    t.equal(allowed(exact, req('/', 'GET', ['x-enx', 'prod'])), false)
    const folded = (h: object): CompiledPolicy => one(allow({ Header: [{ Name: 'x-env', IgnoreCase: true, ...h }] }))
    t.equal(allowed(folded({ Exact: 'PrOd' }), req('/', 'GET', ['x-env', 'pROD'])), true)
    t.equal(allowed(folded({ Exact: 'prod' }), req('/', 'GET', ['x-env', 'prods'])), false)
    t.equal(allowed(folded({ Exact: 'prod' }), req('/', 'GET', ['x-env', 'prox'])), false)
    t.equal(allowed(folded({ Prefix: 'PR' }), req('/', 'GET', ['x-env', 'prod'])), true)
    t.equal(allowed(folded({ Prefix: 'prod-eu' }), req('/', 'GET', ['x-env', 'prod'])), false)
    t.equal(allowed(folded({ Suffix: 'OD' }), req('/', 'GET', ['x-env', 'prod'])), true)
    t.equal(allowed(folded({ Suffix: 'xprod' }), req('/', 'GET', ['x-env', 'prod'])), false)
    t.equal(allowed(folded({ Contains: 'RO' }), req('/', 'GET', ['x-env', 'PROD'])), true)
    t.equal(allowed(folded({ Contains: 'ro' }), req('/', 'GET', ['x-env', 'prod'])), true)
    t.equal(allowed(folded({ Contains: 'x' }), req('/', 'GET', ['x-env', 'prod'])), false)
  })

  t.test('IgnoreCase is ASCII-only, like Envoy', async (t) => {
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Exact: 'é', IgnoreCase: true }] })), req('/', 'GET', ['x', Buffer.from('É').toString('latin1')])), false)
  })

  t.test('headers: Prefix, Suffix, Contains and Regex without IgnoreCase', async (t) => {
    const h = (m: object, v: string): boolean => allowed(one(allow({ Header: [{ Name: 'x', ...m }] })), req('/', 'GET', ['x', v]))
    t.equal(h({ Prefix: 'ab' }, 'abc'), true)
    t.equal(h({ Prefix: 'ab' }, 'Abc'), false)
    t.equal(h({ Suffix: 'bc' }, 'abc'), true)
    t.equal(h({ Suffix: 'bc' }, 'abC'), false)
    t.equal(h({ Contains: 'b' }, 'abc'), true)
    t.equal(h({ Contains: 'B' }, 'abc'), false)
    t.equal(h({ Regex: '[0-9]+' }, '123'), true)
    t.equal(h({ Regex: '[0-9]+' }, '12a'), false)
  })

  t.test('repeated headers are joined with "," before matching (T25)', async (t) => {
    const p = one(allow({ Header: [{ Name: 'x-role', Exact: 'a,b,c' }] }))
    t.equal(allowed(p, req('/', 'GET', ['X-Role', 'a', 'other', 'z', 'x-role', 'b', 'x-role', 'c'])), true)
    t.equal(headerValue(['A', '1', 'a', '2'], 'a'), '1,2')
    t.equal(headerValue(['A', '1', 'b'], 'b'), undefined, 'a dangling name without a value is ignored')
  })

  t.test('a missing header never matches a value matcher, even inverted; Present+Invert means absent', async (t) => {
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Regex: '.*', Invert: true }] })), req()), false)
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Present: true, Invert: true }] })), req()), true)
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Present: true, Invert: true }] })), req('/', 'GET', ['x', ''])), false)
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Exact: 'a', Invert: true }] })), req('/', 'GET', ['x', 'b'])), true)
  })

  t.test('Host and :authority are one header; HTTP/2 carries :authority', async (t) => {
    const p = one(allow({ Header: [{ Name: ':authority', Exact: 'api' }] }))
    t.equal(allowed(p, req('/', 'GET', ['Host', 'api'])), true)
    headerAmbiguity.reason = null
    t.equal(allowed(p, req('/', 'GET', [':authority', 'api', 'host', 'api'])), true, 'both present and equal')
    t.equal(headerAmbiguity.reason, null, 'no ambiguity')
    t.equal(allowed(one(allow({ Header: [{ Name: 'HOST', Exact: 'api' }] })), req('/', 'GET', [':authority', 'api'])), true)
  })

  t.test(':scheme is set on every request, as Envoy sets it: what HTTP/2 sends, https over HTTP/1.1', async (t) => {
    const https = one(allow({ Header: [{ Name: ':scheme', Exact: 'https' }] }))
    t.equal(allowed(https, req('/', 'GET', ['Host', 'api'])), true, 'HTTP/1.1 has no :scheme: the connection is TLS')
    t.equal(allowed(https, req('/', 'GET', [':method', 'GET', ':scheme', 'https', ':authority', 'api'])), true)
    t.equal(allowed(https, req('/', 'GET', [':method', 'GET', ':scheme', 'http', ':authority', 'api'])), false, 'HTTP/2: as sent')
    t.equal(allowed(https, req('/', 'GET', ['Host', 'api', 'X-Forwarded-Proto', 'http'])), true, 'never taken from X-Forwarded-Proto')
    const denyHttps = one(deny({ Header: [{ Name: ':Scheme', Prefix: 'http' }] }), true)
    t.equal(allowed(denyHttps, req('/', 'GET', ['Host', 'api'])), false, 'a deny on it applies over HTTP/1.1 too')
  })

  t.test('headers are read as the application reads them (docs/semantics.md#transport-headers)', async (t) => {
    t.test('HTTP/2 host differing from :authority: host (what Fastify reads) decides, and the ambiguity is recorded', async (t) => {
      const p = one(deny({ Header: [{ Name: 'host', Exact: 'admin.internal' }] }), true)
      headerAmbiguity.reason = null
      t.equal(allowed(p, req('/', 'GET', [':method', 'GET', ':authority', 'public', 'host', 'admin.internal'])), false)
      t.equal(headerAmbiguity.reason, 'HTTP/2 host header differs from :authority')
      headerAmbiguity.reason = null
    })

    t.test('a name Node keeps single-valued: the first value (what req.headers holds), and the repetition is recorded', async (t) => {
      const p = one(deny({ Header: [{ Name: 'Host', Exact: 'admin.internal' }] }), true)
      for (const raw of [['Host', 'admin.internal', 'HOST', 'public'], [':method', 'GET', 'host', 'admin.internal', 'host', 'public']]) {
        headerAmbiguity.reason = null
        t.equal(allowed(p, req('/', 'GET', raw)), false, `${raw[0]}: the first value decides`)
        t.equal(headerAmbiguity.reason, 'header host sent more than once')
      }
      headerAmbiguity.reason = null
      t.equal(headerValue(['User-Agent', 'a', 'user-agent', 'b'], 'user-agent', singleValued('user-agent')), 'a')
      t.equal(headerAmbiguity.reason, 'header user-agent sent more than once')
      headerAmbiguity.reason = null
    })

    t.test('single-valued per transport: Node joins if-match over HTTP/1.1, keeps the first over HTTP/2; server the reverse', async (t) => {
      t.equal(headerValue(['If-Match', 'a', 'If-Match', 'b'], 'if-match', singleValued('if-match')), 'a,b')
      t.equal(headerValue(['Server', 'a', 'Server', 'b'], 'server', singleValued('server')), 'a')
      t.equal(headerAmbiguity.reason, 'header server sent more than once')
      headerAmbiguity.reason = null
      t.equal(headerValue([':path', '/', 'server', 'a', 'server', 'b'], 'server', singleValued('server')), 'a,b')
      t.equal(headerValue([':path', '/', 'if-match', 'a', 'if-match', 'b'], 'if-match', singleValued('if-match')), 'a')
      t.equal(headerAmbiguity.reason, 'header if-match sent more than once')
      headerAmbiguity.reason = null
      t.equal(singleValued('x-env'), 0)
    })

    t.test('cookie crumbs are joined with "; " (RFC 9113 §8.2.3), as Node joins them for the application', async (t) => {
      const p = one(deny({ Header: [{ Name: 'cookie', Exact: 'session=1; role=admin' }] }), true)
      t.equal(allowed(p, req('/', 'GET', [':method', 'GET', 'cookie', 'session=1', 'cookie', 'role=admin'])), false, 'HTTP/2 crumbs')
      t.equal(allowed(p, req('/', 'GET', ['Cookie', 'session=1', 'Cookie', 'role=admin'])), false, 'repeated HTTP/1.1 lines')
      t.equal(headerAmbiguity.reason, null, 'cookie is a list, not an ambiguity')
    })
  })

  t.test(':method is the request method and :path the raw request target', async (t) => {
    t.equal(allowed(one(allow({ Header: [{ Name: ':method', Exact: 'PATCH' }] })), req('/', 'PATCH')), true)
    t.equal(allowed(one(allow({ Header: [{ Name: ':path', Exact: '/a?x=1' }] })), req('/a', 'GET', [], '/a?x=1')), true)
    t.equal(allowed(one(allow({ Header: [{ Name: ':scheme', Exact: 'https' }] })), req('/', 'GET', [':scheme', 'https'])), true, 'other pseudo-headers are read from rawHeaders')
  })

  t.test('all parts of a permission must match (AND)', async (t) => {
    const p = one(allow({ PathPrefix: '/a', Methods: ['POST'], Header: [{ Name: 'x', Present: true }, { Name: 'y', Exact: '1' }] }))
    t.equal(allowed(p, req('/a/b', 'POST', ['x', '', 'y', '1'])), true)
    t.equal(allowed(p, req('/a/b', 'POST', ['x', '', 'y', '2'])), false)
    t.equal(allowed(p, req('/b', 'POST', ['x', '', 'y', '1'])), false)
  })

  t.test('non-ASCII: rule strings compare as UTF-8 bytes, regexes read header bytes as UTF-8', async (t) => {
    const utf8 = (s: string): string => Buffer.from(s, 'utf8').toString('latin1') // how Node hands over raw bytes
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Exact: 'café' }] })), req('/', 'GET', ['x', utf8('café')])), true)
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Regex: 'caf.' }] })), req('/', 'GET', ['x', utf8('café')])), true)
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Regex: 'caf.' }] })), req('/', 'GET', ['x', 'café'])), true, 'a lone latin1 byte is not valid UTF-8 but still one character')
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Regex: 'é€' }] })), req('/', 'GET', ['x', 'é€'])), true, 'a string wider than bytes is matched as is')
    t.equal(allowed(one(allow({ Header: [{ Name: 'x', Regex: '€é' }] })), req('/', 'GET', ['x', '€é'])), true)
    t.equal(allowed(one(allow({ PathRegex: '/caf.' })), req(utf8('/café'))), true, 'a path kept raw (normalization disabled) too')
    // Path rules are compared in the percent-encoded alphabet of canonical paths (docs/semantics.md#paths-non-ascii).
    t.equal(allowed(one(allow({ PathExact: '/café' })), req('/caf%C3%A9')), true, 'a non-ASCII path rule matches the encoded path')
    t.equal(allowed(one(allow({ PathPrefix: '/caf\u00e9/' })), req('/caf%C3%A9/x')), true)
    t.equal(allowed(one(allow({ PathExact: '/café' })), req(utf8('/café'))), false, 'not raw bytes: canonical paths never carry them')
  })

  t.test('asciiLower returns its input when there is nothing to lower', async (t) => {
    const s = 'abc-1'
    t.equal(asciiLower(s), s)
    t.equal(asciiLower('AbC-1'), 'abc-1')
  })
})

t.test('compilation errors name the intention and the problem (docs/semantics.md#re2)', async (t) => {
  const bad = (t: Test, intentions: unknown[], message: RegExp | string, input: Partial<PolicyInput> = {}): void => {
    t.throws(() => compilePolicy({ destination: 'api', intentions: intentions as Intention[], defaultAllow: false, protocol: 'http', ...input }),
      typeof message === 'string' ? { message } : { message })
  }
  const perm = (p: unknown): Intention => ixn('web', 'api', 9, [p as IntentionPermission])

  t.test('a regex RE2 rejects fails the whole update with InvalidIntentionsError', async (t) => {
    for (const re of ['(?=x)', '(a)\\1', '/a(', 'a{1001}']) {
      try {
        policy([ixn('web', 'api', 9, [allow({ PathRegex: re })])])
        t.fail('should throw')
      } catch (err) {
        t.ok(err instanceof InvalidIntentionsError, re)
        t.equal((err as { code: string }).code, 'FST_CONSUL_NATIVE_INVALID_INTENTIONS')
        t.match((err as Error).message, `Intention default/web => default/api (Precedence 9) cannot be enforced: Permissions[0].HTTP.PathRegex ${JSON.stringify(re)} is not a valid RE2 regular expression`)
      }
    }
    bad(t, [perm(allow({ Header: [{ Name: 'x', Regex: '\\C' }] }))], /Permissions\[0\]\.HTTP\.Header\[0\]\.Regex "\\\\C" is not a valid RE2/)
  })

  t.test('L7 permissions are compiled even on a tcp service, so a bad regex is reported there too', async (t) => {
    bad(t, [perm(allow({ PathRegex: '(' }))], /not a valid RE2/, { protocol: 'tcp' })
  })

  t.test('a repeated pattern is compiled once and still validated', async (t) => {
    const p = policy([ixn('a', 'api', 9, [allow({ PathRegex: '/x+' })]), ixn('b', 'api', 9, [allow({ Header: [{ Name: 'h', Regex: '/x+' }] })])])
    t.equal(decide(p, who('b'), req('/', 'GET', ['h', '/xx'])).allow, true)
  })

  t.test('the intention\'s shape is the agent client\'s to check (lib/agent/parse.ts); the engine fails closed anyway', async (t) => {
    t.equal(decide(policy([{ ...ixn('web', 'api', 9, 'allow'), Action: undefined }]), WEB, req()).allow, false, 'no action: deny')
    t.doesNotThrow(() => policy([{ ...ixn('web', 'api', 9, 'allow'), SourceNS: null as never, SourcePeer: null as never, SourceSamenessGroup: null as never }]))
  })

  t.test('permissions must be unambiguous, and unknown fields are refused rather than ignored', async (t) => {
    bad(t, [perm('x')], /Permissions\[0\] must be an object/)
    bad(t, [perm({ Action: 'allow', Http: {} })], /Permissions\[0\]\.Http is not a known field \(Action, HTTP, JWT\)/)
    bad(t, [perm({ Action: 'permit', HTTP: { PathPrefix: '/' } })], /Permissions\[0\]\.Action must be "allow" or "deny"/)
    bad(t, [perm(allow([] as never))], /Permissions\[0\]\.HTTP must be an object/)
    bad(t, [perm(allow({ PathPrefix: '/', QueryParam: [] } as never))], /HTTP\.QueryParam is not a known field/)
    bad(t, [perm(allow({ PathPrefix: '/', PathExact: '/a' }))], /HTTP must set at most one of PathExact, PathPrefix, PathRegex/)
    bad(t, [perm(allow({ PathPrefix: 1 } as never))], /HTTP\.PathPrefix must be a string/)
    bad(t, [perm(allow({ Methods: 'GET' } as never))], /HTTP\.Methods must be an array of method names/)
    bad(t, [perm(allow({ Methods: [1] } as never))], /HTTP\.Methods\[0\] must be a string/)
    bad(t, [perm(allow({ Header: {} } as never))], /HTTP\.Header must be an array of header matchers/)
    bad(t, [perm(allow({ Header: [1] } as never))], /HTTP\.Header\[0\] must be an object/)
    bad(t, [perm(allow({ Header: [{ Name: 'x', Exact: 'a', Treat: true }] } as never))], /Header\[0\]\.Treat is not a known field/)
    bad(t, [perm(allow({ Header: [{ Exact: 'a' }] } as never))], /Header\[0\]\.Name must be a non-empty string/)
    bad(t, [perm(allow({ Header: [{ Name: 'x' }] }))], /Header\[0\] must set exactly one of Present, Exact, Prefix, Suffix, Contains, Regex/)
    bad(t, [perm(allow({ Header: [{ Name: 'x', Present: false, Exact: '' }] }))], /must set exactly one of/)
    bad(t, [perm(allow({ Header: [{ Name: 'x', Present: true, Exact: 'a' }] }))], /must set exactly one of/)
    bad(t, [perm(allow({ Header: [{ Name: 'x', Present: 'yes' }] } as never))], /Header\[0\]\.Present must be a boolean/)
    bad(t, [perm(allow({ Header: [{ Name: 'x', Present: true, IgnoreCase: true }] }))], /Header\[0\]\.IgnoreCase is only allowed with Exact, Prefix, Suffix or Contains/)
    bad(t, [perm(allow({ Header: [{ Name: 'x', Regex: 'a', IgnoreCase: true }] }))], /IgnoreCase is only allowed/)
  })

  t.test('what Consul already validated is not re-checked: any method spelling, any path shape', async (t) => {
    const p = policy([ixn('web', 'api', 9, [allow({ Methods: ['get', 'get'], PathExact: 'x' }), allow({ Header: [], Methods: [] })])])
    t.equal(decide(p, WEB, req('x', 'get')).allow, true)
    t.equal(decide(p, WEB, req('/', 'PUT')).reason, 'intention default/web => default/api (precedence 9), permission 2 (allow)')
    t.equal(decide(policy([ixn('web', 'api', 9, [allow({ Methods: null, Header: null } as never)])]), WEB, req()).allow, true)
    t.equal(decide(policy([ixn('web', 'api', 9, [allow({ PathExact: null, Header: [{ Name: 'x', Present: null, Exact: 'a' }] } as never)])]), WEB, req('/', 'GET', ['x', 'a'])).allow, true)
  })

  t.test('a destination that is not a name, ns/name or partition/ns/name is refused', async (t) => {
    bad(t, [], 'destination "a/b/c/d" must be "name", "namespace/name" or "partition/namespace/name"', { destination: 'a/b/c/d' })
    bad(t, [], /destination "a\/\/b" must be/, { destination: 'a//b' })
  })

  t.test('only compilePolicy() makes a CompiledPolicy: the types refuse a look-alike', async (t) => {
    const lookAlike = { defaultAllow: true, size: 0, warnings: [] }
    // @ts-expect-error a plain object is not a compiled policy (its rules are private)
    const unused = (): Decision => decide(lookAlike, WEB, req())
    t.type(unused, 'function')
  })
})

t.test('warnings', async (t) => {
  t.test('a literal path rule with lower-case escapes is not flagged: requests keep their escapes as written, as in Envoy', async (t) => {
    const p = policy([
      ixn('web', 'api', 9, [allow({ PathExact: '/x%2fy' })]),
      ixn('b', 'api', 9, [allow({ PathPrefix: '/%c3%a9' })])
    ])
    t.same(p.warnings, [])
    t.same(policy([ixn('b', 'api', 9, [deny({ PathPrefix: '/%c3%A9' })])]).warnings, ['intention default/b => default/api (Precedence 9), permission 1: ' +
      'PathPrefix "/%c3%A9" has escapes in both hex cases: it matches only requests that spell them so (a deny written in one case also covers the other case): ' +
      'write its escapes in one case'], 'one whose escapes mix the two cases is')
    t.same(policy([ixn('b', 'api', 9, [deny({ PathExact: '/%aF' })])]).warnings.length, 1, 'within one escape too')
    t.equal(decideSpellings(p, null, WEB, req('/x%2fy'), []).allow, true)
    t.equal(decideSpellings(p, null, WEB, req('/x%2Fy'), []).allow, false)
  })
})

t.test('ordering helpers', async (t) => {
  t.test('compareBytes orders by UTF-8 bytes, not UTF-16 units', async (t) => {
    t.ok(compareBytes('a', 'b') < 0)
    t.ok(compareBytes('ab', 'a') > 0)
    t.equal(compareBytes('same', 'same'), 0)
    t.ok(compareBytes('*', 'a') < 0)
    // U+FF61 (EF BD A1) sorts before U+1F600 (F0 9F 98 80), although its UTF-16 unit is larger.
    t.ok(compareBytes('\uff61', '\u{1f600}') < 0)
    t.ok(compareBytes('\u{1f600}', '\uff61') > 0)
    t.ok(compareBytes('\ud7ff', '\uff61') < 0)
  })

  t.test('comparePrecedence: precedence descending, then the tie-break fields ascending', async (t) => {
    const a = ixn('a', 'api', 9, 'allow')
    t.ok(comparePrecedence(a, ixn('a', 'api', 8, 'allow')) < 0)
    t.ok(comparePrecedence(a, ixn('b', 'api', 9, 'allow')) < 0)
    t.ok(comparePrecedence(a, ixn('a', 'api', 9, 'allow', { SourcePeer: 'p' })) < 0)
    t.equal(comparePrecedence(a, ixn('a', 'api', 9, 'deny')), 0)
  })
})

t.test('route overrides', async (t) => {
  const svc = policy([ixn('web', 'api', 9, 'allow'), ixn('ops', 'api', 9, [allow({ PathPrefix: '/' })])])

  t.test('the first source in precedence order decides; an unmatched caller leaves it to the policy (null)', async (t) => {
    const o = compileOverride([{ name: '*', action: 'deny' }, { name: 'ops', action: 'allow' }])
    t.equal(o.size, 2)
    t.same(decideOverride(o, who('ops'), req()), { allow: true, reason: 'route override sources[1] ops allow' })
    t.same(decideOverride(o, WEB, req()), { allow: false, reason: 'route override sources[0] * deny' })
    t.equal(decideOverride(o, who('ops', 'other'), req()), null)
    t.equal(decideOverride(o, who('ops', 'default', 'eu'), req()), null)
  })

  t.test('namespace and partition default to default; wildcards sort after exact names', async (t) => {
    const o = compileOverride([{ name: '*', namespace: '*', action: 'deny' }, { name: 'web', namespace: 'team-a', partition: 'eu', action: 'allow' },
      { name: '*', namespace: 'team-a', partition: 'eu', action: 'deny' }, { name: 'web', namespace: 'team-a', action: 'allow' },
      { name: 'db', namespace: 'team-a', action: 'allow' }, { name: 'web', partition: 'eu', action: 'allow' }])
    t.equal(decideOverride(o, who('web', 'team-a', 'eu'), req())?.reason, 'route override sources[1] eu/team-a/web allow')
    t.equal(decideOverride(o, who('db', 'team-a', 'eu'), req())?.reason, 'route override sources[2] eu/team-a/* deny')
    t.equal(decideOverride(o, who('web', 'team-a'), req())?.reason, 'route override sources[3] team-a/web allow')
    t.equal(decideOverride(o, who('web', 'default', 'eu'), req())?.reason, 'route override sources[5] eu/default/web allow')
    t.equal(decideOverride(o, who('x', 'team-b'), req())?.reason, 'route override sources[0] default/* deny'.replace('default/*', '*/*'))
  })

  t.test('L7 sources: first matching permission; no match means the default, which only a policy can supply', async (t) => {
    const o = compileOverride([{ name: 'web', permissions: [{ Action: 'deny', HTTP: { PathPrefix: '/admin' } }, { Action: 'allow', HTTP: { Methods: ['get'] } }] }])
    t.same(decideOverride(o, WEB, req('/admin')), { allow: false, reason: 'route override sources[0] web, permission 1 (deny)' })
    t.same(decideOverride(o, WEB, req('/x', 'GET')), { allow: true, reason: 'route override sources[0] web, permission 2 (allow)' }, 'methods are upper-cased at compile time')
    t.same(decideOverride(o, WEB, req('/x', 'POST')), { allow: false, reason: 'route override sources[0] web: no permission matched (deny)' })
    t.same(decideOverride(o, WEB, req('/x', 'POST'), policy([], true)), { allow: true, reason: 'route override sources[0] web: no permission matched, default policy (allow)' })
    t.same(decideOverride(o, WEB, req('/x', 'POST'), svc), { allow: false, reason: 'route override sources[0] web: no permission matched, default policy (deny)' })
  })

  t.test('an empty permissions list with an action is L4, as in Consul', async (t) => {
    t.equal(decideOverride(compileOverride([{ name: 'web', action: 'allow', permissions: [] }]), WEB, req())?.allow, true)
  })

  t.test('only compileOverride() makes a CompiledOverride: the types refuse a look-alike', async (t) => {
    // @ts-expect-error a plain object is not a compiled override
    const unused = (): Decision | null => decideOverride({ size: 1 }, WEB, req())
    t.type(unused, 'function')
  })

  t.test('sources are validated like a service-intentions config entry', async (t) => {
    const bad = (sources: unknown, message: string | RegExp): void => {
      try {
        compileOverride(sources as RouteSource[])
        t.fail(`should throw ${String(message)}`)
      } catch (err) {
        t.ok(err instanceof TypeError && err instanceof RuleError)
        t.match((err as Error).message, message)
      }
    }
    const ok = { name: 'web', action: 'allow' }
    const p = (perm: unknown): unknown => [{ name: 'web', permissions: [perm] }]
    bad([ok, 'web'], 'sources[1] must be an object')
    bad([{ ...ok, Name: 'x' }], 'sources[0].Name is not a known field (name, namespace, partition, action, permissions, jwt)')
    bad([{ action: 'allow' }], 'sources[0].name must be a non-empty string')
    bad([{ name: '', action: 'allow' }], 'sources[0].name must be a non-empty string')
    bad([{ name: 'web*', action: 'allow' }], 'sources[0].name must be "*" or contain no "*"')
    bad([{ ...ok, namespace: 3 }], 'sources[0].namespace must be a non-empty string')
    bad([{ ...ok, namespace: 'team*' }], 'sources[0].namespace must be "*" or contain no "*"')
    bad([{ ...ok, namespace: '*' }], 'sources[0]: an exact name cannot follow a wildcard namespace')
    bad([{ ...ok, partition: '*' }], 'sources[0].partition cannot contain "*"')
    bad([{ name: 'web', action: 'ALLOW' }], 'sources[1 - 1].action must be "allow" or "deny"'.replace('1 - 1', '0'))
    bad([{ name: 'web', permissions: {} }], 'sources[0].permissions must be an array')
    bad([{ name: 'web', action: 'allow', permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' } }] }], 'sources[0] must set either action or permissions, not both')
    bad([{ name: 'web' }], 'sources[0] must set action or permissions')
    bad([{ name: 'web', permissions: [] }], 'sources[0] must set action or permissions')
    bad([ok, { name: 'web', namespace: 'default', action: 'deny' }], 'sources[1] repeats source default/default/web (already sources[0])')
    bad([{ name: '*', action: 'allow' }, { name: '*', action: 'allow' }], 'sources[1] repeats source default/default/*')
    bad(p(null), 'sources[0].permissions[0] must be an object')
    bad(p({ Action: 'allow' }), 'sources[0].permissions[0].HTTP is required')
    bad(p({ Action: 'allow', HTTP: null }), 'sources[0].permissions[0].HTTP is required')
    bad(p({ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: '' }] } }), 'sources[0].permissions[0].JWT.Providers[0].Name must be a non-empty string')
    bad(p({ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Provider: [] } }), 'sources[0].permissions[0].JWT.Provider is not a known field (Providers)')
    bad([{ ...ok, jwt: { Providers: [{ Name: 'a', Claims: [] }] } }], 'sources[0].jwt.Providers[0].Claims is not a known field (Name, VerifyClaims)')
    bad([{ ...ok, jwt: { Providers: [{ Name: 'a', VerifyClaims: [{ Path: 'role', Value: 'x' }] }] } }], 'sources[0].jwt.Providers[0].VerifyClaims[0].Path must be an array of strings')
    bad(p({ Action: 'allow', HTTP: {} }), 'sources[0].permissions[0].HTTP must set at least one of PathExact, PathPrefix, PathRegex, Methods, Header')
    bad(p({ Action: 'allow', HTTP: { Methods: [] } }), /must set at least one of/)
    bad(p({ Action: 'allow', HTTP: { PathExact: 'x' } }), 'sources[0].permissions[0].HTTP.PathExact must start with "/"')
    bad(p({ Action: 'allow', HTTP: { PathPrefix: 'x' } }), 'sources[0].permissions[0].HTTP.PathPrefix must start with "/"')
    bad(p({ Action: 'allow', HTTP: { PathRegex: '(' } }), /sources\[0\]\.permissions\[0\]\.HTTP\.PathRegex "\(" is not a valid RE2 regular expression/)
    bad(p({ Action: 'allow', HTTP: { Methods: ['GET', 'FETCH'] } }), 'sources[0].permissions[0].HTTP.Methods[1] "FETCH" is not one of GET, HEAD, POST, PUT, PATCH, DELETE, CONNECT, OPTIONS, TRACE')
    bad(p({ Action: 'allow', HTTP: { Methods: ['GET', 'get'] } }), 'sources[0].permissions[0].HTTP.Methods[1] repeats GET')
    bad(p({ Action: 'allow', HTTP: { Header: [{ Name: 'x', Present: true, Suffix: 'a' }] } }), /Header\[0\] must set exactly one of/)
  })

  t.test('regexes are compiled at registration, so a valid one works at once', async (t) => {
    const o = compileOverride([{ name: 'web', permissions: [{ Action: 'allow', HTTP: { PathRegex: '/v[0-9]+/.*', Header: [{ Name: 'x', Regex: 'a+' }] } }] }])
    t.equal(decideOverride(o, WEB, req('/v2/x', 'GET', ['x', 'aa']))?.allow, true)
  })
})

t.test('decideSpellings: override, then policy, then the router spellings of the path', async (t) => {
  const svc = policy([
    ixn('web', 'api', 9, [deny({ PathExact: '/admin' }), allow({ PathPrefix: '/' })]),
    ixn('db', 'api', 9, 'allow'),
    ixn('ops', 'api', 9, [allow({ PathExact: '/items' })])
  ])
  const o: CompiledOverride = compileOverride([{ name: 'ops', permissions: [{ Action: 'deny', HTTP: { PathExact: '/x' } }, { Action: 'allow', HTTP: { PathPrefix: '/' } }] }])

  t.test('without alternates it is decideOverride ?? decide', async (t) => {
    t.same(decideSpellings(svc, null, WEB, req('/a'), []), decide(svc, WEB, req('/a')))
    t.same(decideSpellings(svc, o, who('ops'), req('/a'), []), decideOverride(o, who('ops'), req('/a'), svc))
    t.same(decideSpellings(svc, o, WEB, req('/admin'), []), decide(svc, WEB, req('/admin')))
    t.same(decideSpellings(svc, o, who('nobody'), req('/'), []), { allow: false, reason: 'default policy (deny)' })
  })

  t.test('an alternate spelling that a deny permission catches denies the request', async (t) => {
    t.same(decideSpellings(svc, null, WEB, req('/admin/'), ['/admin']), {
      allow: false,
      reason: 'intention default/web => default/api (precedence 9), permission 1 (deny) for another spelling of the path that reaches the same route'
    })
    t.equal(decideSpellings(svc, o, who('ops'), req('/x/'), ['/y', '/x']).allow, false)
  })

  t.test('an alternate that only reaches an allow or the default changes nothing (allow-lists keep working)', async (t) => {
    t.same(decideSpellings(svc, null, who('ops'), req('/items'), ['/items/']), decide(svc, who('ops'), req('/items')))
    t.equal(decideSpellings(svc, null, WEB, req('/a'), ['/b']).allow, true)
  })

  t.test('alternates are not consulted when the primary verdict is already deny or does not depend on the path', async (t) => {
    t.equal(decideSpellings(svc, null, WEB, req('/admin'), ['/zzz']).reason, 'intention default/web => default/api (precedence 9), permission 1 (deny)')
    t.equal(decideSpellings(svc, null, who('db'), req('/a'), ['/admin']).reason, 'intention default/db => default/api (precedence 9) allow')
  })
})

t.test('hot path: an L4 decision returns a shared, frozen decision object', async (t) => {
  const p = policy([ixn('web', 'api', 9, 'allow')])
  const a = decide(p, WEB, req())
  t.equal(decide(p, who('web'), req('/other')), a)
  t.ok(Object.isFrozen(a))
})

t.test('compiled matchers have named fields and literal kinds (docs/semantics.md#permissions, docs/semantics.md#headers)', async (t) => {
  const header = new HeaderMatcher({ name: 'x-env', source: 'header', kind: 'prefix', value: 'prod', regex: null, ignoreCase: false, invert: false })
  const matcher = new PermissionMatcher({ methods: ['GET'], pathKind: 'prefix', pathValue: '/a', pathRegex: null, headers: [header] })
  t.equal(matcher.matches('GET', '/a/b', '/a/b', ['X-Env', 'production']), true)
  t.equal(matcher.matches('GET', '/a/b', '/a/b', ['X-Env', 'staging']), false)
  t.equal(matcher.matches('PUT', '/a/b', '/a/b', ['X-Env', 'production']), false)
  const kinds: PathMatchKind[] = ['none', 'exact', 'prefix', 'regex']
  const headerKinds: HeaderMatchKind[] = ['present', 'exact', 'prefix', 'suffix', 'contains', 'regex']
  const sources: HeaderSource[] = ['header', 'method', 'path', 'authority']
  t.equal(kinds.length + headerKinds.length + sources.length, 14)
  // @ts-expect-error a kind is one of the named literals, not a number
  const numbered: PathMatchKind = 1
  t.equal(numbered, 1)
})
