// Path canonicalization (docs/semantics.md#path-normalization, T44-T47) and the router spellings the hook must
// also check so that no request reaches a handler that its canonical spelling would be denied.
import t from 'tap'
import fc from 'fast-check'
import type { Intention, RequestNormalization } from '../lib/agent/wire'
import { type RouterOptions, canonicalPath, routerPaths } from '../lib/intentions/path'
import { compilePolicy, decideSpellings } from '../lib/intentions/policy'

const DEFAULTS: RouterOptions = { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false }
const router = (o: Partial<RouterOptions>): RouterOptions => ({ ...DEFAULTS, ...o })

t.test('canonicalPath with Consul\'s default normalization', async (t) => {
  t.test('an already canonical target is returned as is', async (t) => {
    for (const url of ['/', '/a/b', '/a/b/', '/a.b/c.', '/.well-known/x', '/a/..b', '/a/.b', '/a/b..', "/!$&'()*+,;=:@[]~_-.", '//a//b']) {
      t.equal(canonicalPath(url, null), url, url)
    }
  })

  t.test('the query string and fragment are stripped', async (t) => {
    t.equal(canonicalPath('/v1/items?limit=5', null), '/v1/items')
    t.equal(canonicalPath('/a#frag', null), '/a')
    t.equal(canonicalPath('/?x', null), '/')
    t.equal(canonicalPath('/a?b=/../c', null), '/a', 'the query is never normalized')
    t.equal(canonicalPath('/a/.?x', null), '/a/', 'a dot segment right before the query is still resolved')
    t.equal(canonicalPath('/a/b/..#x', null), '/a/')
    t.equal(canonicalPath('/a/.b?x', null), '/a/.b')
  })

  t.test('dot segments are resolved and never climb above the root', async (t) => {
    const cases: Array<[string, string]> = [
      ['/a/./b', '/a/b'], ['/a/../b', '/b'], ['/a/b/..', '/a/'], ['/a/b/.', '/a/b/'], ['/.', '/'], ['/..', '/'],
      ['/../a', '/a'], ['/../../a/../../b', '/b'], ['/a//../b', '/a/b'], ['/a//..', '/a/'], ['/./', '/'],
      ['/a/%2e%2E/b', '/b'], ['/a/.%2e/b', '/b'], ['/a/%2e/b', '/a/b'], ['/public/../admin', '/admin']
    ]
    for (const [url, want] of cases) t.equal(canonicalPath(url, null), want, url)
  })

  t.test('a backslash is a slash (T47)', async (t) => {
    t.equal(canonicalPath('/value\\supersecret', null), '/value/supersecret')
    t.equal(canonicalPath('/a\\..\\b', null), '/b')
  })

  t.test('escapes of unreserved characters are decoded (T44), others kept as written', async (t) => {
    t.equal(canonicalPath('/value/%73upersecret', null), '/value/supersecret')
    t.equal(canonicalPath('/%41%5a%61%7a%30%39%2D%2e%5F%7E', null), '/AZaz09-._~')
    // Other escapes keep their hex case, as Envoy's normalizer keeps them (its own test vectors).
    t.equal(canonicalPath('/a%2fb%3b%25%c3%a9%Fa', null), '/a%2fb%3b%25%c3%a9%Fa')
    t.equal(canonicalPath('/a/%2F%2f/c', null), '/a/%2F%2f/c')
    t.equal(canonicalPath('/%c0%af', null), '/%c0%af')
    t.equal(canonicalPath('/%5c%25', null), '/%5c%25')
    // Escapes the normalizer writes itself are upper-case.
    t.equal(canonicalPath('/a b\u00e9%2f', null), '/a%20b%E9%2f')
    t.equal(canonicalPath('/%2F', null), '/%2F', 'an escaped slash is kept by default (T46)')
  })

  t.test('characters a path may not carry are percent-encoded, non-ASCII as its bytes', async (t) => {
    t.equal(canonicalPath('/a b"<>^`{|}\x7f\x01', null), '/a%20b%22%3C%3E%5E%60%7B%7C%7D%7F%01')
    t.equal(canonicalPath('/caf\u00e9', null), '/caf%E9', 'Node hands raw bytes over as latin1 chars')
    t.equal(canonicalPath('/\u20ac', null), '/%E2%82%AC')
    t.equal(canonicalPath('/\u{1f600}x', null), '/%F0%9F%98%80x')
    t.equal(canonicalPath('/\ud800x', null), '/%EF%BF%BDx')
  })

  t.test('NUL and malformed escapes are refused (null): the router refuses them too', async (t) => {
    for (const url of ['/a%00', '/a\x00', '/a%', '/a%4', '/a%zz', '/a%g1', '/a%4g', '/a%:0']) t.equal(canonicalPath(url, null), null, JSON.stringify(url))
  })

  t.test('an absolute-form target is reduced to its path; anything else is refused', async (t) => {
    t.equal(canonicalPath('http://api.example/a/../b?x', null), '/b')
    t.equal(canonicalPath('HTTPS://api:8443', null), '/')
    t.equal(canonicalPath('http://api?x=/y', null), '/')
    t.equal(canonicalPath('http://api#/y', null), '/')
    for (const url of ['*', '', 'a/b', '\\a', 'ftp://h/a', 'http:///a', 'http:/a']) t.equal(canonicalPath(url, null), null, url)
  })
})

t.test('canonicalPath with a mesh RequestNormalization', async (t) => {
  const n = (o: RequestNormalization): RequestNormalization => o

  t.test('MergeSlashes collapses runs of slashes after dot segments are resolved (T45)', async (t) => {
    t.equal(canonicalPath('/value//supersecret', n({ MergeSlashes: true })), '/value/supersecret')
    t.equal(canonicalPath('//a///b/', n({ MergeSlashes: true })), '/a/b/')
    t.equal(canonicalPath('/a//../b', n({ MergeSlashes: true })), '/a/b')
    t.equal(canonicalPath('/a/b', n({ MergeSlashes: true })), '/a/b')
    t.equal(canonicalPath('/a//b', n({ MergeSlashes: false })), '/a//b')
  })

  t.test('UNESCAPE_AND_FORWARD and UNESCAPE_AND_REDIRECT decode escaped slashes before normalizing (T46)', async (t) => {
    for (const action of ['UNESCAPE_AND_FORWARD', 'UNESCAPE_AND_REDIRECT'] as const) {
      const o = n({ PathWithEscapedSlashesAction: action })
      t.equal(canonicalPath('/value%2Fsupersecret', o), '/value/supersecret', action)
      t.equal(canonicalPath('/a%2f..%2fb', o), '/b')
      t.equal(canonicalPath('/a%5cb%5C', o), '/a/b/')
      t.equal(canonicalPath('/a%41', o), '/aA')
      t.equal(canonicalPath('/a', o), '/a')
    }
  })

  t.test('REJECT_REQUEST refuses a path with an escaped slash, and only that', async (t) => {
    const o = n({ PathWithEscapedSlashesAction: 'REJECT_REQUEST' })
    t.equal(canonicalPath('/value%2Fsupersecret', o), null)
    t.equal(canonicalPath('/a%5c', o), null)
    t.equal(canonicalPath('/a%20', o), '/a%20')
    t.equal(canonicalPath('/a?x=%2F', o), '/a', 'the query does not count')
  })

  t.test('KEEP_UNCHANGED, IMPLEMENTATION_SPECIFIC_DEFAULT and "" keep escaped slashes', async (t) => {
    for (const action of ['KEEP_UNCHANGED', 'IMPLEMENTATION_SPECIFIC_DEFAULT', ''] as const) {
      t.equal(canonicalPath('/a%2fb', n({ PathWithEscapedSlashesAction: action })), '/a%2fb', action)
    }
    t.equal(canonicalPath('/a%2fb', n({})), '/a%2fb')
  })

  t.test('InsecureDisablePathNormalization keeps the raw path, still stripping the query', async (t) => {
    const o = n({ InsecureDisablePathNormalization: true })
    for (const url of ['/a/../%41', '/a\\b', '/a b', '/a%zz', '/caf\u00e9', '/./.']) t.equal(canonicalPath(url, o), url, JSON.stringify(url))
    t.equal(canonicalPath('/a/../b?x', o), '/a/../b')
    t.equal(canonicalPath('/a//b', { ...o, MergeSlashes: true }), '/a/b')
    t.equal(canonicalPath('/a%2fb%5Cc%41', { ...o, PathWithEscapedSlashesAction: 'UNESCAPE_AND_FORWARD' }), '/a/b\\c%41')
    t.equal(canonicalPath('/a%41', { ...o, PathWithEscapedSlashesAction: 'UNESCAPE_AND_FORWARD' }), '/a%41')
  })
})

t.test('canonicalPath properties', async (t) => {
  const piece = fc.constantFrom('a', 'B', '/', '.', '..', '\\', '%2e', '%2F', '%2f', '%5C', '%41', '%7e', '%c3', '%', ' ', '"', ';', '(', '?', '#', '\u00e9', '//')
  const target = fc.array(piece, { maxLength: 12 }).map((p) => '/' + p.join(''))
  const normalization = fc.option(fc.record({
    InsecureDisablePathNormalization: fc.boolean(),
    MergeSlashes: fc.boolean(),
    PathWithEscapedSlashesAction: fc.constantFrom('', 'KEEP_UNCHANGED', 'UNESCAPE_AND_FORWARD', 'REJECT_REQUEST') as fc.Arbitrary<RequestNormalization['PathWithEscapedSlashesAction']>
  }, { requiredKeys: [] }))

  t.test('it is idempotent: a canonical path is its own canonical form', async (t) => {
    fc.assert(fc.property(target, normalization, (url, o) => {
      const c = canonicalPath(url, o)
      return c === null || canonicalPath(c, o) === c
    }), { numRuns: 3000 })
    t.pass()
  })

  t.test('with normalization on, the result has no dot segment, backslash or query, and no escape the target did not carry in that spelling', async (t) => {
    fc.assert(fc.property(target, (url) => {
      const c = canonicalPath(url, null)
      if (c === null) return true
      if (!c.startsWith('/') || /\/\.\.?(\/|$)|\\|\?|#/.test(c)) return false
      // A lower-case escape is one the target spelled so: the normalizer writes upper-case ones.
      return (c.match(/%(?:[0-9A-F][a-f]|[a-f][0-9A-Fa-f])/g) ?? []).every((escape) => url.includes(escape))
    }), { numRuns: 3000 })
    t.pass()
  })

  t.test('dot segments and backslashes resolve exactly as the WHATWG URL parser resolves them', async (t) => {
    // Whole segments only: Node 20's URL parser mishandles segments such as '.a' after '//'.
    const segment = fc.tuple(fc.constantFrom('/', '\\'), fc.constantFrom('', 'a', 'b', '.', '..'))
    const simple = fc.array(segment, { minLength: 1, maxLength: 8 }).map((s) => '/' + s.map(([sep, seg]) => seg + sep).join('').slice(0, -1))
    fc.assert(fc.property(simple, (url) => canonicalPath(url, null) === new URL('http://h' + url).pathname), { numRuns: 3000 })
    t.pass()
  })
})

t.test('routerPaths', async (t) => {
  t.test('with Fastify\'s defaults and nothing to add it returns one shared, frozen empty array', async (t) => {
    const a = routerPaths('/a', DEFAULTS)
    t.same(a, [])
    t.equal(routerPaths('/b/c', DEFAULTS, '/b/c'), a)
    t.equal(routerPaths('/b', DEFAULTS, '/b?x=1'), a, 'a query string alone changes nothing')
    t.equal(routerPaths('/b', DEFAULTS, '/b#f'), a, 'nor a fragment')
    t.same(routerPaths('/b', DEFAULTS, '/a?/b'), ['/a'], 'a target that is not this path is looked at')
    t.equal(routerPaths('/', router({ ignoreTrailingSlash: true })), a, 'the root has no trailing-slash twin')
    t.equal(routerPaths('/a', router({ ignoreDuplicateSlashes: true, useSemicolonDelimiter: true })), a)
    t.ok(Object.isFrozen(a))
  })

  t.test('the router view of the raw target: dot segments, backslashes and slashes it leaves alone', async (t) => {
    t.same(routerPaths('/admin', DEFAULTS, '/public/../admin?x'), ['/public/../admin'])
    t.same(routerPaths('/a/b', DEFAULTS, '/a\\b'), ['/a\\b'])
    t.same(routerPaths('/a/b', DEFAULTS, '/a%2fb'), ['/a%2fb', '/a%2Fb'], 'with UNESCAPE_AND_FORWARD the router still sees %2f, in either hex case')
    t.same(routerPaths('/admin', DEFAULTS, '/%61dmin'), [], 'the same route, spelled canonically: nothing to add')
    t.same(routerPaths('/%61dmin', DEFAULTS, '/%61dmin'), ['/admin'], 'with normalization disabled the router still decodes %61')
    t.same(routerPaths('/a', DEFAULTS, '/a%zz'), [], 'a target the router refuses adds nothing')
    t.same(routerPaths('/', DEFAULTS, '*'), [], 'nor does one that is not a path')
  })

  t.test('characters find-my-way decodes but the canonical form keeps get both spellings', async (t) => {
    t.same(routerPaths('/f(1)', DEFAULTS), ['/f%281%29'])
    t.same(routerPaths('/a%21%27%28%29%2A%5B%5D%2a', DEFAULTS), ['/a%21%27%28%29%2A%5B%5D%2A', '/a%21%27%28%29%2a%5b%5d%2a', "/a!'()*[]*"],
      'decoded, and the escapes in either hex case')
    t.same(routerPaths('/a%2Fb', DEFAULTS), ['/a%2fb'], 'an escaped slash routes differently: only its other hex case')
  })

  t.test('escapes in the other hex case: a deny written in either case sees the path', async (t) => {
    t.same(routerPaths('/a%2fb%c3%A9', DEFAULTS, '/a%2fb%c3%A9'), ['/a%2Fb%C3%A9', '/a%2fb%c3%a9', '/a%2fb%C3%A9', '/a/b%C3%A9', '/a/b%c3%a9'],
      'both cases, then the router\'s decoded path (its own escapes kept as written) and the parameter\'s, each in both cases too')
    t.ok(routerPaths('/ADMIN%2fusers', router({ caseSensitive: false }), '/ADMIN%2fusers').includes('/admin%2Fusers'),
      'lower-cased by the router, with its escapes upper-cased: a deny written /admin%2F still sees it')
    t.same(routerPaths('/a%20b', DEFAULTS, '/a%20b'), [], 'digits only: one spelling')
    t.same(routerPaths('/a%2fb', router({ caseSensitive: false }), '/a%2fb'), ['/a%2Fb', '/a/b'], 'lower-cased by the router options too')
  })

  t.test('ignoreTrailingSlash: with and without one trailing slash', async (t) => {
    const o = router({ ignoreTrailingSlash: true })
    t.same(routerPaths('/admin/', o), ['/admin'])
    t.same(routerPaths('/admin', o), ['/admin/'])
  })

  t.test('ignoreDuplicateSlashes: the merged spelling', async (t) => {
    t.same(routerPaths('//a//b', router({ ignoreDuplicateSlashes: true })), ['/a/b'])
    t.same(routerPaths('/a//b/', router({ ignoreDuplicateSlashes: true, ignoreTrailingSlash: true })), ['/a/b/', '/a/b'])
  })

  t.test('caseSensitive false: the lower-case spellings', async (t) => {
    t.same(routerPaths('/Admin', router({ caseSensitive: false })), ['/admin'])
    t.same(routerPaths('/Admin/', router({ caseSensitive: false, ignoreTrailingSlash: true })), ['/Admin', '/admin/', '/admin'])
  })

  t.test('useSemicolonDelimiter: the path before the first ";"', async (t) => {
    t.same(routerPaths('/admin;jsessionid=1', router({ useSemicolonDelimiter: true })), ['/admin'])
    t.same(routerPaths('/admin;x/', router({ useSemicolonDelimiter: true, ignoreTrailingSlash: true })), ['/admin', '/admin/'])
  })
})

t.test('path rules end to end (docs/semantics.md#router-spellings): canonicalPath + routerPaths + decideSpellings', async (t) => {
  const ixn = (perms: Intention['Permissions']): Intention => ({
    SourceNS: 'default',
    SourceName: 'web',
    DestinationNS: 'default',
    DestinationName: 'api',
    SourceType: 'consul',
    Permissions: perms,
    Precedence: 9,
    CreateIndex: 1,
    ModifyIndex: 1
  })
  const web = { partition: '', namespace: 'default', service: 'web' }
  const run = (perms: Intention['Permissions'], url: string, opts: RouterOptions, norm: RequestNormalization | null = null, defaultAllow = true): boolean => {
    const policy = compilePolicy({ destination: 'api', intentions: [ixn(perms)], defaultAllow, protocol: 'http' })
    const path = canonicalPath(url, norm)
    if (path === null) return false
    return decideSpellings(policy, null, web, { method: 'GET', path, url, rawHeaders: [] }, routerPaths(path, opts, url)).allow
  }
  const denyAdmin: Intention['Permissions'] = [{ Action: 'deny', HTTP: { PathExact: '/admin' } }]

  t.test('a trailing slash cannot dodge a PathExact deny when the router ignores it', async (t) => {
    t.equal(run(denyAdmin, '/admin/', router({ ignoreTrailingSlash: true })), false)
    t.equal(run(denyAdmin, '/admin/', DEFAULTS), true, 'without the option it is another route, as in Envoy')
  })

  t.test('nor can case, duplicate slashes or a semicolon, under the matching router options', async (t) => {
    t.equal(run(denyAdmin, '/ADMIN', router({ caseSensitive: false })), false)
    t.equal(run(denyAdmin, '//admin', router({ ignoreDuplicateSlashes: true })), false)
    t.equal(run(denyAdmin, '/admin;x', router({ useSemicolonDelimiter: true })), false)
  })

  t.test('dot segments cannot reach a wildcard route whose prefix is denied', async (t) => {
    t.equal(run([{ Action: 'deny', HTTP: { PathPrefix: '/public/' } }], '/public/../admin', DEFAULTS), false)
  })

  t.test('with normalization disabled, an escaped letter cannot dodge a deny either', async (t) => {
    t.equal(run(denyAdmin, '/%61dmin', DEFAULTS, { InsecureDisablePathNormalization: true }), false)
  })

  t.test('escapes are compared in the hex case the request wrote, as Envoy keeps it; a deny in the other case still denies', async (t) => {
    const denyLower: Intention['Permissions'] = [{ Action: 'deny', HTTP: { PathPrefix: '/files/a%2fb' } }]
    t.equal(run(denyLower, '/files/a%2fb/secret', DEFAULTS), false, 'a deny written in lower case matches the same spelling')
    t.equal(run(denyLower, '/files/a%2Fb/secret', DEFAULTS), false, 'and the other case (an alternate spelling, which only adds denials)')
    const denyUpper: Intention['Permissions'] = [{ Action: 'deny', HTTP: { PathPrefix: '/x/%E2%82%AC' } }]
    t.equal(run(denyUpper, '/x/%e2%82%ac/y', DEFAULTS), false)
    t.equal(run([{ Action: 'deny', HTTP: { PathPrefix: '/x/%e2%82%ac' } }], '/x/%e2%82%ac/y', DEFAULTS), false)
    const allowUpper: Intention['Permissions'] = [{ Action: 'allow', HTTP: { PathExact: '/files/a%2Fb' } }]
    t.equal(run(allowUpper, '/files/a%2Fb', DEFAULTS, null, false), true)
    t.equal(run(allowUpper, '/files/a%2fb', DEFAULTS, null, false), false, 'Envoy compares the path as sent: an allow in the other case does not match')
  })

  t.test('an allow-list is not broken by the other spellings', async (t) => {
    const allowItems: Intention['Permissions'] = [{ Action: 'allow', HTTP: { PathExact: '/items' } }]
    t.equal(run(allowItems, '/items', router({ ignoreTrailingSlash: true }), null, false), true)
    t.equal(run(allowItems, '/items/', router({ ignoreTrailingSlash: true }), null, false), false, 'the request\'s own spelling still has to be allowed (T11)')
  })
})
