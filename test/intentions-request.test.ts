// The whole request decision as one call: exemption, identity, mesh normalization (path, header
// names), route override, service intentions, router spellings and the routed path, and mode 'agent'.
import t from 'tap'
import type { IntentionPermission, RequestNormalization } from '../lib/agent/wire'
import type { RouterOptions } from '../lib/intentions/path'
import { type CallerIdentity, type DecisionTrace, compileOverride, compilePolicy, newRuleMemo } from '../lib/intentions/policy'
import { type RequestView, type RouteRules, type ServiceRules, decideRequest, jwtProvidersNeeded, newVerdict } from '../lib/intentions/request'
import { ixn } from './helpers/intentions'

const ROUTER: RouterOptions = { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false }
const allow = (HTTP: IntentionPermission['HTTP']): IntentionPermission => ({ Action: 'allow', HTTP })
const deny = (HTTP: IntentionPermission['HTTP']): IntentionPermission => ({ Action: 'deny', HTTP })
const WEB: CallerIdentity = { partition: '', namespace: 'default', service: 'web' }
const OPS: CallerIdentity = { partition: '', namespace: 'default', service: 'ops' }

const policy = compilePolicy({
  destination: 'api',
  defaultAllow: false,
  protocol: 'http',
  intentions: [
    ixn('web', 'api', 9, [deny({ PathPrefix: '/admin' }), deny({ Header: [{ Name: 'x-debug', Present: true }] }), allow({ PathPrefix: '/' })]),
    ixn('ops', 'api', 9, 'allow')
  ]
})
const SERVICE: RouteRules = { exempt: false, override: null }
const EXEMPT: RouteRules = { exempt: true, override: null }
const OVERRIDE: RouteRules = { exempt: false, override: compileOverride([{ name: 'ops', action: 'deny' }]) }

function service (normalization: RequestNormalization | null = null, extra: Partial<ServiceRules> = {}): ServiceRules {
  return { policy, normalization, router: ROUTER, agentDecides: false, ...extra }
}

function view (url: string, caller: CallerIdentity | null = WEB, rawHeaders: string[] = []): RequestView {
  return { caller, method: 'GET', url, rawHeaders }
}

function decided (svc: ServiceRules, route: RouteRules, request: RequestView): [string, string, boolean] {
  const v = decideRequest(svc, route, request, newVerdict())
  return [v.outcome, v.decision.reason, v.dropUnderscoreHeaders]
}

t.test('each outcome, in the order the checks run', async (t) => {
  const web = 'intention default/web => default/api (precedence 9)'
  const cases: Array<[string, ServiceRules, RouteRules, RequestView, [string, string, boolean]]> = [
    ['an exempt route needs no identity', service(), EXEMPT, view('/admin', null), ['exempt', 'route exempt (config.consulNative: false)', false]],
    ['no identity: unauthenticated', service(), SERVICE, view('/', null), ['unauthenticated', 'unauthenticated', false]],
    ['a path the normalization rejects, before any intention', service(), SERVICE, view('/a%00'), ['bad-path', 'path rejected by the mesh request normalization', false]],
    ['an underscore header under REJECT_REQUEST', service({ HeadersWithUnderscoresAction: 'REJECT_REQUEST' }), SERVICE, view('/', WEB, ['x_a', '1']),
      ['bad-header', 'header name with an underscore rejected by the mesh request normalization', false]],
    ['without underscores REJECT_REQUEST changes nothing', service({ HeadersWithUnderscoresAction: 'REJECT_REQUEST' }), SERVICE, view('/', WEB, ['x-a', '1']),
      ['allow', `${web}, permission 3 (allow)`, false]],
    ['under DROP_HEADER the dropped header no longer matches', service({ HeadersWithUnderscoresAction: 'DROP_HEADER' }), SERVICE, view('/', WEB, ['x_debug', '1', 'y', '2']),
      ['allow', `${web}, permission 3 (allow)`, true]],
    ['while a header under ALLOW still does', service({ HeadersWithUnderscoresAction: 'ALLOW' }), SERVICE, view('/', WEB, ['x-debug', '1', 'x_a', '1']),
      ['deny', `${web}, permission 2 (deny)`, false]],
    ['a canonical allow', service(), SERVICE, view('/v1/items?x=1'), ['allow', `${web}, permission 3 (allow)`, false]],
    ['a canonical deny', service(), SERVICE, view('/admin'), ['deny', `${web}, permission 1 (deny)`, false]],
    ['a non-canonical spelling decides on the canonical path', service(), SERVICE, view('/%61dmin?x'), ['deny', `${web}, permission 1 (deny)`, false]],
    ['a route override decides first', service(), OVERRIDE, view('/', OPS), ['deny', 'route override sources[0] ops deny', false]],
    ['the service decides for callers the override does not name', service(), OVERRIDE, view('/admin'), ['deny', `${web}, permission 1 (deny)`, false]]
  ]
  for (const [name, svc, route, request, expected] of cases) t.same(decided(svc, route, request), expected, name)
  t.same(decided(service(), SERVICE, view('/', OPS)), ['allow', 'intention default/ops => default/api (precedence 9) allow', false], 'without the override ops is allowed')
})

t.test('router spellings: another spelling the router treats alike can only add a denial', async (t) => {
  const caseless: ServiceRules = service(null, { router: { ...ROUTER, caseSensitive: false } })
  t.same(decided(service(), SERVICE, view('/ADMIN'))[0], 'allow', 'case-sensitive router: /ADMIN is another route')
  t.same(decided(caseless, SERVICE, view('/ADMIN')), ['deny',
    'intention default/web => default/api (precedence 9), permission 1 (deny) for another spelling of the path that reaches the same route', false])
  const twin: RouteRules = { exempt: false, override: null, router: { ...ROUTER, caseSensitive: false } }
  t.same(decided(service(), twin, view('/ADMIN'))[0], 'deny', 'a route\'s own router options win over the service\'s')
})

t.test('the path the router dispatched on must be allowed in its own right', async (t) => {
  const open = compilePolicy({
    destination: 'api',
    defaultAllow: false,
    protocol: 'http',
    intentions: [ixn('web', 'api', 9, [allow({ PathPrefix: '/public/' })])]
  })
  const svc = service(null, { policy: open })
  t.same(decided(svc, SERVICE, view('/public/x')), ['allow', 'intention default/web => default/api (precedence 9), permission 1 (allow)', false])
  t.same(decided(svc, SERVICE, view('/public/../public/x'))[0], 'allow', 'both /public/x and the routed /public/../public/x are allowed')
  t.same(decided(svc, SERVICE, view('/admin/../public/x')), ['deny', 'intention default/web => default/api (precedence 9): no permission matched, default policy (deny)', false],
    '/public/x is allowed, but the router dispatches on /admin/../public/x')
  t.same(decided(svc, SERVICE, view('/public/%78'))[0], 'allow', 'an escape the router decodes alike is the same route')
})

t.test('mode agent: route overrides decide here, the agent for everything else', async (t) => {
  const agent = service(null, { agentDecides: true })
  t.same(decided(agent, SERVICE, view('/admin')), ['ask-agent', 'awaiting the agent\'s authorize answer', false])
  t.same(decided(agent, OVERRIDE, view('/', WEB))[0], 'ask-agent', 'the override does not name web')
  t.same(decided(agent, OVERRIDE, view('/', OPS)), ['deny', 'route override sources[0] ops deny', false])
  const l7 = { exempt: false, override: compileOverride([{ name: 'web', permissions: [{ Action: 'allow', HTTP: { PathExact: '/a' } }] }]) }
  t.same(decided(agent, l7, view('/a?x'))[0], 'allow')
  t.same(decided(agent, l7, view('/b')), ['deny', 'route override sources[0] web: no permission matched, default policy (deny)', false],
    'no permission matched: the service\'s default policy decides')
  t.same(decided(agent, SERVICE, view('/a%00')), ['bad-path', 'path rejected by the mesh request normalization', false], 'normalization applies in every mode')
})

t.test('mode agent: a caller whose intention requires a JWT is denied without asking the agent (docs/semantics.md#agent-mode)', async (t) => {
  const jwtPolicy = compilePolicy({
    destination: 'api',
    defaultAllow: true,
    protocol: 'http',
    intentions: [ixn('web', 'api', 9, 'allow', { JWT: { Providers: [{ Name: 'okta' }] } }), ixn('ops', 'api', 9, 'allow')]
  })
  const agent = service(null, { agentDecides: true, policy: jwtPolicy })
  t.same(decided(agent, SERVICE, view('/')), ['deny', 'the caller\'s intention requires a JWT, which mode \'agent\' cannot enforce (deny)', false])
  t.same(decided(agent, SERVICE, view('/', OPS))[0], 'ask-agent')
  t.same(jwtProvidersNeeded(agent, SERVICE, WEB), [], 'no token is verified for the agent')
  const override = { exempt: false, override: compileOverride([{ name: 'web', action: 'allow', jwt: { Providers: [{ Name: 'okta' }] } }]) }
  t.same(jwtProvidersNeeded(agent, override, WEB), ['okta'], 'an override\'s requirement is enforced here')
  const tokens = { payload: (name: string) => (name === 'okta' ? {} : null) }
  t.same(decided(agent, override, { ...view('/'), jwt: tokens })[0], 'allow')
  t.same(decided(agent, EXEMPT, view('/')), ['exempt', 'route exempt (config.consulNative: false)', false])
  t.same(jwtProvidersNeeded(agent, EXEMPT, WEB), [])
  t.same(jwtProvidersNeeded(agent, override, null), [], 'no identity, no token')
})

t.test('a header matcher on :path sees the normalized path with the query', async (t) => {
  const p = compilePolicy({
    destination: 'api',
    defaultAllow: false,
    protocol: 'http',
    intentions: [ixn('web', 'api', 9, [allow({ Header: [{ Name: ':path', Exact: '/a?q=1' }] })])]
  })
  const svc = service(null, { policy: p })
  t.same(decided(svc, SERVICE, view('/a?q=1'))[0], 'allow')
  t.same(decided(svc, SERVICE, view('/%61?q=1'))[0], 'allow')
  t.same(decided(svc, SERVICE, view('/./a?q=1'))[0], 'allow', 'the re-check of the routed /./a still matches :path on the normalized target')
  t.same(decided(svc, SERVICE, view('/a'))[0], 'deny')
  // A fragment is refused (Fastify would parse it as query, where no :path matcher saw it).
  for (const target of ['/a?q=1#frag', '/./a?q=1#f', '/a#&admin=1', '/a?x#&admin=1', '/#']) {
    t.same(decided(svc, SERVICE, view(target)), ['bad-path', 'request target with a fragment (#) rejected, as by the mesh', false], target)
  }
})

t.test('a :path matcher reads every spelling the router treats alike, with the query', async (t) => {
  const p = compilePolicy({
    destination: 'api',
    defaultAllow: true,
    protocol: 'http',
    intentions: [ixn('web', 'api', 9, [deny({ Header: [{ Name: ':path', Prefix: '/secret' }] }), deny({ Header: [{ Name: ':path', Contains: 'role=admin' }] })])]
  })
  const caseless = service(null, { policy: p, router: { ...ROUTER, caseSensitive: false, ignoreDuplicateSlashes: true } })
  for (const url of ['/secret', '/SECRET', '//secret', '/Secret?x=1']) t.same(decided(caseless, SERVICE, view(url))[0], 'deny', url)
  t.same(decided(caseless, SERVICE, view('/ITEMS?role=admin'))[0], 'deny', 'the query goes with each spelling')
  t.same(decided(caseless, SERVICE, view('/ITEMS?role=user'))[0], 'allow')
})

t.test('a fragment cannot get past a :path matcher (docs/semantics.md#transport-headers)', async (t) => {
  const p = compilePolicy({
    destination: 'api',
    defaultAllow: false,
    protocol: 'http',
    intentions: [ixn('web', 'api', 9, [
      deny({ Header: [{ Name: ':path', Exact: '/admin' }] }),
      deny({ Header: [{ Name: ':path', Suffix: '.php' }] }),
      deny({ Header: [{ Name: ':path', Regex: '/secret(\\?.*)?' }] }),
      allow({ PathPrefix: '/' })
    ])]
  })
  const svc = service(null, { policy: p })
  t.same(decided(svc, SERVICE, view('/admin'))[0], 'deny')
  // A target with a fragment is refused whatever the matchers would say (docs/semantics.md#transport-headers).
  for (const url of ['/admin#x', '/x.php#', '/x.php#y?z', '/secret#a', '/secret?a#b', '/./admin#x', '/admin2#x', '/a#?admin']) {
    t.same(decided(svc, SERVICE, view(url))[0], 'bad-path', url)
  }
  t.same(decided(svc, SERVICE, view('/admin2'))[0], 'allow')
})

t.test('an absolute-form target must name the authority of its host header (docs/semantics.md#transport-headers)', async (t) => {
  const p = compilePolicy({
    destination: 'api',
    defaultAllow: true,
    protocol: 'http',
    intentions: [ixn('web', 'api', 9, [deny({ Header: [{ Name: 'Host', Suffix: 'bad.com', IgnoreCase: true }] }), allow({ PathPrefix: '/' })])]
  })
  const svc = service(null, { policy: p })
  const reason = 'absolute-form request target names another authority than the host header'
  t.same(decided(svc, SERVICE, view('http://foo.bad.com/', WEB, ['Host', 'good.com']))[0], 'bad-header', 'Envoy would match foo.bad.com, the application reads good.com')
  t.same(decided(svc, SERVICE, view('http://foo.bad.com/', WEB, ['Host', 'good.com']))[1], reason)
  t.same(decided(svc, SERVICE, view('http://foo.bad.com/', WEB, []))[0], 'bad-header', 'no host header at all')
  t.same(decided(svc, SERVICE, view('HTTP://user@Good.COM/x?y', WEB, ['Host', 'good.com']))[0], 'allow', 'the same authority (case, userinfo aside)')
  t.same(decided(svc, SERVICE, view('http://foo.bad.com/x', WEB, ['Host', 'FOO.bad.com']))[0], 'deny', 'agreeing: the rule reads it')
  t.same(decided(svc, SERVICE, view('https://good.com:8443/', WEB, [':method', 'GET', ':authority', 'good.com:8443']))[0], 'allow', 'HTTP/2 :authority')
  t.same(decided(svc, SERVICE, view('https://good.com:8443/', WEB, ['Host', 'good.com']))[0], 'bad-header', 'a port is part of the authority')
  t.same(decided(svc, SERVICE, view('/x', WEB, ['Host', 'good.com']))[0], 'allow', 'origin form: Host alone')
})

t.test('a deny that names GET denies HEAD too: Fastify answers HEAD with the GET handler (docs/semantics.md#methods)', async (t) => {
  const p = compilePolicy({
    destination: 'api',
    defaultAllow: true,
    protocol: 'http',
    intentions: [
      ixn('web', 'api', 9, [deny({ PathPrefix: '/reports', Methods: ['GET'] }), allow({ PathPrefix: '/' })]),
      ixn('ops', 'api', 9, [allow({ PathPrefix: '/probe', Methods: ['HEAD'] }), deny({ PathPrefix: '/probe', Methods: ['GET'] }), allow({ PathPrefix: '/x', Methods: ['GET'] }), deny({ PathPrefix: '/' })])
    ]
  })
  const svc = service(null, { policy: p })
  const as = (method: string, url: string, caller = WEB): string => decideRequest(svc, SERVICE, { caller, method, url, rawHeaders: [] }, newVerdict()).outcome
  t.equal(as('GET', '/reports/export'), 'deny')
  t.equal(as('HEAD', '/reports/export'), 'deny', 'the GET handler would run')
  t.equal(as('POST', '/reports/export'), 'allow', 'other methods as written')
  t.equal(as('HEAD', '/other'), 'allow')
  t.equal(as('HEAD', '/probe', OPS), 'allow', 'an allow on HEAD placed first still decides (first match)')
  t.equal(as('GET', '/probe', OPS), 'deny')
  t.equal(as('HEAD', '/x', OPS), 'deny', 'an allow on GET does not allow HEAD (T16)')
  const override: RouteRules = { exempt: false, override: compileOverride([{ name: 'web', permissions: [{ Action: 'deny', HTTP: { Methods: ['get'] } }, { Action: 'allow', HTTP: { PathPrefix: '/' } }] }] as never) }
  t.equal(decideRequest(svc, override, { caller: WEB, method: 'HEAD', url: '/any', rawHeaders: [] }, newVerdict()).outcome, 'deny', 'route overrides alike')
})

t.test('the verdict object is reused: every call overwrites every field', async (t) => {
  const out = newVerdict()
  decideRequest(service({ HeadersWithUnderscoresAction: 'DROP_HEADER' }), SERVICE, view('/', WEB, ['x_a', '1']), out)
  t.equal(out.dropUnderscoreHeaders, true)
  t.equal(decideRequest(service(), EXEMPT, view('/'), out), out)
  t.same(out, { outcome: 'exempt', decision: { allow: true, reason: 'route exempt (config.consulNative: false)' }, dropUnderscoreHeaders: false })
})

t.test('a header the decision reads ambiguously rejects the request (docs/semantics.md#transport-headers)', async (t) => {
  const p = compilePolicy({
    destination: 'api',
    defaultAllow: true,
    protocol: 'http',
    intentions: [ixn('web', 'api', 9, [deny({ Header: [{ Name: 'host', Exact: 'admin.internal' }] }), allow({ PathPrefix: '/' })])]
  })
  const svc = service(null, { policy: p })
  t.same(decided(svc, SERVICE, view('/', WEB, ['Host', 'public', 'Host', 'admin.internal'])),
    ['bad-header', 'header host sent more than once', false], 'HTTP/1.1: a repeated Host, whatever the first value')
  t.same(decided(svc, SERVICE, view('/', WEB, [':method', 'GET', ':authority', 'public', 'host', 'admin.internal'])),
    ['bad-header', 'HTTP/2 host header differs from :authority', false])
  t.same(decided(svc, SERVICE, view('/', WEB, [':method', 'GET', ':authority', 'public'])), ['allow', 'intention default/web => default/api (precedence 9), permission 2 (allow)', false],
    'the next request starts without the previous ambiguity')
  t.same(decided(svc, SERVICE, view('/', WEB, ['User-Agent', 'a', 'User-Agent', 'b']))[0], 'allow', 'a repeated header no rule reads changes nothing')
})

t.test("the caller's rule memo: remembered per policy, never across policies, and passed over by a trace", async (t) => {
  const web = 'intention default/web => default/api (precedence 9)'
  const memo = newRuleMemo()
  const withMemo = (url: string, caller: CallerIdentity = WEB): RequestView => ({ ...view(url, caller), callerRules: memo })
  t.same(decided(service(), SERVICE, withMemo('/')), ['allow', `${web}, permission 3 (allow)`, false])
  t.equal(memo.serial, policy.serial, 'filled for the policy that decided')
  t.not(memo.rule, null)
  t.same(decided(service(), SERVICE, withMemo('/admin')), ['deny', `${web}, permission 1 (deny)`, false], 'the remembered rule still reads the path')

  // A new policy (here: the same sources, web now denied) is never answered from the old one's memo.
  const stricter = compilePolicy({ destination: 'api', defaultAllow: false, protocol: 'http', intentions: [ixn('web', 'api', 9, 'deny')] })
  t.not(stricter.serial, policy.serial)
  t.same(decided(service(null, { policy: stricter }), SERVICE, withMemo('/')), ['deny', `${web} deny`, false])
  t.equal(memo.serial, stricter.serial)
  const none = compilePolicy({ destination: 'api', defaultAllow: false, protocol: 'http', intentions: [] })
  t.same(decided(service(null, { policy: none }), SERVICE, withMemo('/')), ['deny', 'default policy (deny)', false], 'no rule is remembered too')
  t.equal(memo.rule, null)
  t.same(decided(service(), SERVICE, withMemo('/')), ['allow', `${web}, permission 3 (allow)`, false], 'and back')

  // A route override decides before the service's policy, memo or not.
  const opsMemo = newRuleMemo()
  t.same(decided(service(), SERVICE, { ...view('/', OPS), callerRules: opsMemo }), ['allow', 'intention default/ops => default/api (precedence 9) allow', false])
  t.same(decided(service(), OVERRIDE, { ...view('/', OPS), callerRules: opsMemo }), ['deny', 'route override sources[0] ops deny', false])

  // A trace lists the sources passed over, so it looks them up even when the memo knows the rule.
  const sources: string[] = []
  const trace: DecisionTrace = { source: (_scope, rule, matched) => { sources.push(`${rule} ${matched}`) }, permission: () => {} }
  decideRequest(service(), SERVICE, withMemo('/'), newVerdict(), trace)
  t.same(sources, ['intention default/ops => default/api (precedence 9) false', `${web} true`], 'ops sorts first and does not match')
})
