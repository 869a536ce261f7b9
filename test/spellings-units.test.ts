// Unit tables for the path, routing and identity rules of docs/semantics.md section 10: the
// router's decoded spellings, non-ASCII rules, the RE2 program-size bound, router options as the
// router reads them, and canonical caller identities.
import t from 'tap'
import { RE2JS } from 're2js'
import Fastify from 'fastify'
import { X509Certificate } from 'node:crypto'
import type { Intention } from '../lib/agent/wire'
import { type RouterOptions, canonicalPath, canonicalRulePath, routerPaths } from '../lib/intentions/path'
import { compileOverride, compilePolicy } from '../lib/intentions/policy'
import { compileHttp, DEFAULT_MAX_REGEX_PROGRAM_SIZE, pathRuleNote, RegexCache } from '../lib/intentions/matchers'
import { routerOptionsOf } from '../lib/fastify-internals'
import { resolveOptions } from '../lib/options'
import { identityFromCertificate, isCaCertificate } from '../lib/identity'
import { decideRequest, newVerdict } from '../lib/intentions/request'
import http2 from 'node:http2'
import { get, leafFor, mtlsClient, rootPems, startAgent, startService } from './helpers/mesh'
import { DevCertificateAuthority } from '../lib/dev-agent/index'

const D: RouterOptions = { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false }
const CI: RouterOptions = { ...D, caseSensitive: false }
const spellings = (url: string, router: RouterOptions = D): readonly string[] => routerPaths(canonicalPath(url, null) as string, router, url)

t.test('router spellings are computed on find-my-way\'s decoded path (docs/semantics.md#paths-unicode-case)', async (t) => {
  t.ok(spellings('/%E2%84%AAv/x', CI).includes('/kv/x'), 'KELVIN SIGN folds to k after decoding')
  t.ok(spellings('/%C4%B0d', CI).includes('/i%CC%87d'), 'U+0130 folds to i + U+0307, spelled as UTF-8')
  t.notOk(spellings('/%E2%84%AAv/x', D).includes('/kv/x'), 'no folding with a case-sensitive router')
  // Each list also has the path with its escapes in the other hex case (docs/semantics.md#paths-guarantees).
  t.same(spellings('/%F0%9F%98%80'), ['/%f0%9f%98%80'], 'an astral character round-trips to its escapes: only the other hex case is added')
  t.same(spellings('/a%20b'), [], 'a decoded space is escaped again')
  t.same(spellings('/f%28%C3%A9'), ['/f%28%c3%a9', '/f(%C3%A9', '/f(%c3%a9'], 'characters the router decodes get their literal spelling')
  t.same(spellings('/a%C3'), ['/a%c3'], 'an escape that is not UTF-8: the router refuses it (400), nothing decoded to add')
  t.same(spellings('/a%C3%A9/', { ...D, ignoreTrailingSlash: true, ignoreDuplicateSlashes: true }), ['/a%c3%a9/', '/a%C3%A9', '/a%c3%a9'])
  t.same(routerPaths('/x', D, 'ftp://h/%41'), [], 'a target that is not origin or http(s) absolute form adds nothing')
  t.same(routerPaths('/tag/c%2B', D, 'https://h/tag/c%2B?x'), ['/tag/c%2b', '/tag/c+'], 'absolute form: its path')
})

t.test('reserved escapes are also decided decoded, as route parameters hold them (docs/semantics.md#paths-parameters)', async (t) => {
  t.same(spellings('/tag/c%2B%2B'), ['/tag/c%2b%2b', '/tag/c++'])
  t.same(spellings('/u/a%40b'), ['/u/a@b'])
  t.same(spellings('/s/a%2Fb'), ['/s/a%2fb', '/s/a/b'])
  t.same(spellings('/s/a%2F..%2Fb'), ['/s/a%2f..%2fb', '/s/a/../b', '/s/b'], 'escaped dot segments, resolved as well')
  t.same(spellings('/p/a%25b'), [], 'a decoded % is spelled %25 again')
  t.same(spellings('/p/%23%3F'), ['/p/%23%3f'], '# and ? are escaped again (the other hex case aside)')
  t.same(spellings('/p/%3b%3D', CI), ['/p/%3B%3D', '/p/%3b%3d', '/p/;='], 'semicolon and equals: kept escaped by the router, decoded in parameters')
  t.ok(spellings('/T/%41%2B', CI).includes('/t/a+'), 'lower-cased too, with a case-insensitive router')
})

t.test('non-ASCII path rules are spelled like canonical paths (docs/semantics.md#paths-non-ascii)', async (t) => {
  t.equal(canonicalRulePath('/café'), '/caf%C3%A9')
  t.equal(canonicalRulePath('/a b"<>'), '/a%20b%22%3C%3E')
  t.equal(canonicalRulePath('/x\u{1F600}y'), '/x%F0%9F%98%80y')
  t.equal(canonicalRulePath('/caf%c3%a9'), '/caf%c3%a9', 'escapes the rule has are left as written')
  const plain = '/plain/path'
  t.equal(canonicalRulePath(plain), plain)
  const cache = new RegexCache()
  t.equal(pathRuleNote(compileHttp({ PathExact: '/a' }, 'p', false, cache)), null)
  t.match(pathRuleNote(compileHttp({ PathPrefix: '/café' }, 'p', false, cache)), /PathPrefix "\/café" is compared as "\/caf%C3%A9"/)
  t.match(pathRuleNote(compileHttp({ PathExact: '/é' }, 'p', false, cache)), /^PathExact/)
  t.match(pathRuleNote(compileHttp({ PathRegex: '/caf.' }, 'p', false, cache)), null)
  t.match(pathRuleNote(compileHttp({ PathRegex: '/café.*' }, 'p', false, cache)), /PathRegex "\/café\.\*" has non-ASCII characters/)
  const ixn = (perms: unknown[]): Intention => ({ SourceName: 'web', DestinationName: 'api', Precedence: 9, Action: '', Permissions: perms } as unknown as Intention)
  const policy = compilePolicy({ destination: 'api', intentions: [ixn([{ Action: 'deny', HTTP: { PathPrefix: '/café' } }])], defaultAllow: true, protocol: 'http' })
  t.match(policy.warnings.join('\n'), /intention default\/web => default\/api \(Precedence 9\), permission 1: PathPrefix "\/café"/)
  const override = compileOverride([{ name: 'web', permissions: [{ Action: 'deny', HTTP: { PathExact: '/é' } }] } as never])
  t.match(override.warnings.join('\n'), /sources\[0\], permission 1: PathExact "\/é" is compared as "\/%C3%A9"/)
  t.same(compileOverride([{ name: 'web', action: 'allow' }]).warnings, [])
})

t.test('RE2 programs are bounded at load (docs/semantics.md#paths-regex-size)', async (t) => {
  const big = '/api/.{0,1000}.{0,1000}x'
  const ixn = { SourceName: 'web', DestinationName: 'api', Precedence: 9, Action: '', Permissions: [{ Action: 'deny', HTTP: { PathRegex: big } }] } as unknown as Intention
  const input = { destination: 'api', intentions: [ixn], defaultAllow: true, protocol: 'http' }
  t.equal(DEFAULT_MAX_REGEX_PROGRAM_SIZE, 1_048_576, 'the bound Consul\'s Envoy bootstrap sets (re2.max_program_size.error_level)')
  t.ok(compilePolicy(input).size === 1, 'by default, what Consul\'s sidecars accept compiles')
  t.match(compilePolicy(input).warnings, [/PathRegex "\/api\/\.\{0,1000\}\.\{0,1000\}x" compiles to an RE2 program of size \d+: matching it can cost/],
    'with a warning: re2js is slow on large programs')
  t.match(compileOverride([{ name: 'web', permissions: [{ Action: 'deny', HTTP: { PathRegex: big } }] } as never]).warnings, [/size \d+: matching it can cost/], 'route overrides too')
  const usual = { ...ixn, Permissions: [{ Action: 'allow', HTTP: { PathRegex: '/users/[a-z0-9-]{1,64}' } }] }
  t.ok(RE2JS.compile('/users/[a-z0-9-]{1,64}').programSize() > 100, 'a usual pattern is above Envoy\'s own default of 100')
  t.ok(compilePolicy({ ...input, intentions: [usual as unknown as Intention] }).size === 1)
  t.same(compilePolicy({ ...input, intentions: [usual as unknown as Intention] }).warnings, [], 'and no warning')
  const strict = { ...input, maxRegexProgramSize: 100 }
  t.throws(() => compilePolicy(strict), { code: 'FST_CONSUL_NATIVE_INVALID_INTENTIONS', message: /RE2 program of size \d+, above the limit of 100 \(raise it with the maxRegexProgramSize option\)/ })
  t.ok(compilePolicy({ ...input, maxRegexProgramSize: 5000 }).size === 1, 'a bound above the program accepts it')
  const header = { ...ixn, Permissions: [{ Action: 'deny', HTTP: { Header: [{ Name: 'x', Regex: '[a-z]{0,200}' }] } }] }
  t.throws(() => compilePolicy({ ...strict, intentions: [header as unknown as Intention] }), { message: /Header\[0\]\.Regex .* above the limit/ }, 'header regexes too')
  for (const bad of [0, 1.5, -1]) t.throws(() => compilePolicy({ ...input, maxRegexProgramSize: bad }), TypeError, `limit ${bad}`)
  t.throws(() => compileOverride([{ name: 'web', permissions: [{ Action: 'deny', HTTP: { PathRegex: big } }] } as never], 100), { message: /above the limit of 100/ })
  t.ok(compileOverride([{ name: 'web', permissions: [{ Action: 'deny', HTTP: { PathRegex: big } }] } as never]).size === 1)
  t.equal(resolveOptions({ service: 'api' }).maxRegexProgramSize, 1_048_576)
  t.equal(resolveOptions({ service: 'api', maxRegexProgramSize: 4096 }).maxRegexProgramSize, 4096)
  for (const bad of [0, 2.5, '100', null]) {
    t.throws(() => resolveOptions({ service: 'api', maxRegexProgramSize: bad }), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /maxRegexProgramSize.*positive integer/ })
  }
})

t.test('router options are the ones the router uses, for every combination of spellings (docs/semantics.md#paths-router-options)', async (t) => {
  // Ground truth: what the router does with each spelling, asked of the router itself.
  const probes: Record<keyof RouterOptions, [string, boolean]> = {
    ignoreTrailingSlash: ['/probe/', true],
    ignoreDuplicateSlashes: ['//probe', true],
    caseSensitive: ['/PROBE', false],
    useSemicolonDelimiter: ['/probe;x', true]
  }
  for (const [key, [url, widened]] of Object.entries(probes) as Array<[keyof RouterOptions, [string, boolean]]>) {
    for (const top of [undefined, true, false]) {
      for (const nested of [undefined, {}, { [key]: true }, { [key]: false }, { maxParamLength: 200 }]) {
        const options: Record<string, unknown> = {}
        if (top !== undefined) options[key] = top
        if (nested !== undefined) options.routerOptions = nested
        const app = Fastify(options as never)
        app.get('/probe', async () => 'ok')
        const routed = (await app.inject(url)).statusCode === 200
        const expected = routed ? widened : !widened
        t.equal(routerOptionsOf(app)[key], expected, `${key}: top-level ${String(top)}, routerOptions ${JSON.stringify(nested)}`)
        await app.close()
      }
    }
  }
})

t.test('without Fastify\'s private options, either spelling that widens counts', async (t) => {
  t.same(routerOptionsOf({ initialConfig: { ignoreTrailingSlash: true, routerOptions: { ignoreTrailingSlash: false } } }),
    { ignoreTrailingSlash: true, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false })
  t.same(routerOptionsOf({ initialConfig: { routerOptions: { caseSensitive: false, useSemicolonDelimiter: true } } }),
    { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: false, useSemicolonDelimiter: true })
  t.same(routerOptionsOf({ initialConfig: {}, [Symbol('fastify.options')]: { routerOptions: null } }),
    { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false })
})

t.test('caller identities: CA:FALSE and Consul\'s canonical SPIFFE ID only (docs/semantics.md#paths-canonical-identity)', async (t) => {
  const ca = await DevCertificateAuthority.create()
  const td = ca.trustDomain
  const issue = async (uri: string, isCa = false): Promise<X509Certificate> =>
    new X509Certificate((await ca.issueCertificate({ uris: [uri], ca: isCa })).certPem)
  const good = `spiffe://${td}/ns/default/dc/dc1/svc/web`
  t.equal(identityFromCertificate(await issue(good), td).identity?.service, 'web')
  t.equal(identityFromCertificate(await issue(`spiffe://${td}/ap/team/ns/default/dc/dc1/svc/web`), td).identity?.partition, 'team')
  const rejected: Array<[string, string, boolean, RegExp]> = [
    ['CA:TRUE', good, true, /CA certificate/],
    ['a percent-encoded service', `spiffe://${td}/ns/default/dc/dc1/svc/w%65b`, false, /not in Consul's canonical form/],
    ['a percent-encoded namespace', `spiffe://${td}/ns/d%65fault/dc/dc1/svc/web`, false, /canonical form/],
    ['an explicit /ap/default', `spiffe://${td}/ap/default/ns/default/dc/dc1/svc/web`, false, /canonical form/],
    ['an upper-case partition', `spiffe://${td}/ap/Team/ns/default/dc/dc1/svc/web`, false, /canonical form/],
    ['an upper-case trust domain', `spiffe://${td.toUpperCase()}/ns/default/dc/dc1/svc/web`, false, /canonical form/]
  ]
  for (const [name, uri, isCa, reason] of rejected) {
    const peer = identityFromCertificate(await issue(uri, isCa), td)
    t.equal(peer.identity, null, name)
    t.match(peer.reason, reason, `${name}: the reason says why`)
  }
})

t.test('basicConstraints is read from the DER structure; anything unreadable counts as a CA', async (t) => {
  const der = (tag: number, ...parts: Buffer[]): Buffer => {
    const body = Buffer.concat(parts)
    const length = body.length < 0x80 ? Buffer.from([body.length]) : Buffer.from([0x81, body.length])
    return Buffer.concat([Buffer.from([tag]), length, body])
  }
  const bytes = (...b: number[]): Buffer => Buffer.from(b)
  const oid = bytes(0x06, 0x03, 0x55, 0x1d, 0x13)
  const cert = (...extensions: Buffer[]): Buffer =>
    der(0x30, der(0x30, der(0xa0, bytes(0x02, 0x01, 0x02)), bytes(0x02, 0x01, 0x01), der(0xa3, der(0x30, ...extensions))))
  const basic = (critical: boolean, ...inner: Buffer[]): Buffer =>
    der(0x30, oid, ...(critical ? [bytes(0x01, 0x01, 0xff)] : []), der(0x04, der(0x30, ...inner)))
  const cases: Array<[string, Buffer, boolean]> = [
    ['CA:TRUE, not critical', cert(basic(false, bytes(0x01, 0x01, 0xff))), true],
    ['CA:TRUE, critical', cert(basic(true, bytes(0x01, 0x01, 0xff), bytes(0x02, 0x01, 0x00))), true],
    ['CA:FALSE as an empty sequence', cert(basic(true)), false],
    ['CA:FALSE written out', cert(basic(false, bytes(0x01, 0x01, 0x00))), false],
    ['only a pathLen', cert(basic(false, bytes(0x02, 0x01, 0x00))), false],
    ['another extension only', cert(der(0x30, bytes(0x06, 0x03, 0x55, 0x1d, 0x0f), der(0x04, bytes(0x03, 0x02, 0x05, 0xa0)))), false],
    ['no extensions', der(0x30, der(0x30, bytes(0x02, 0x01, 0x01))), false],
    ['empty', Buffer.alloc(0), true],
    ['indefinite length', bytes(0x30, 0x80, 0x00, 0x00), true],
    ['a length of five bytes', bytes(0x30, 0x85, 1, 1, 1, 1, 1), true],
    ['a length beyond the end', bytes(0x30, 0x05, 0x30), true],
    ['a truncated tbsCertificate', bytes(0x30, 0x01, 0x30), true],
    ['a truncated field', der(0x30, der(0x30, bytes(0x02, 0x05, 0x01))), true],
    ['truncated extensions', der(0x30, der(0x30, bytes(0xa3, 0x02, 0x30, 0x05))), true],
    ['a truncated extension', der(0x30, der(0x30, der(0xa3, der(0x30, bytes(0x30, 0x07, 0x06))))), true],
    ['a truncated OID', der(0x30, der(0x30, der(0xa3, der(0x30, der(0x30, bytes(0x06, 0x09, 0x55)))))), true],
    ['a truncated critical flag', cert(der(0x30, oid, bytes(0x01, 0x05, 0xff))), true],
    ['no value', cert(der(0x30, oid)), true]
  ]
  for (const [name, input, expected] of cases) t.equal(isCaCertificate(input), expected, name)
})

t.test('a CA:TRUE or non-canonical caller certificate gets 401 over HTTP/1.1 and HTTP/2', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent, { http2: true })
  const ca = await rootPems(agent)
  const td = agent.trustDomain
  for (const [name, uri, isCa] of [
    ['CA:TRUE', `spiffe://${td}/ns/default/dc/dc1/svc/web`, true],
    ['an escaped service name', `spiffe://${td}/ns/default/dc/dc1/svc/w%65b`, false],
    ['an explicit /ap/default', `spiffe://${td}/ap/default/ns/default/dc/dc1/svc/web`, false],
    ['an upper-case trust domain', `spiffe://${td.toUpperCase()}/ns/default/dc/dc1/svc/web`, false]
  ] as const) {
    const issued = await agent.ca.issueCertificate({ uris: [uri], ca: isCa })
    const creds = { key: issued.privateKeyPem, cert: issued.certPem, ca }
    t.equal((await get(mtlsClient(t, creds), `${svc.origin}/`)).status, 401, `${name}: HTTP/1.1`)
    const session = http2.connect(svc.origin, { ...creds, checkServerIdentity: () => undefined })
    const status = await new Promise<number>((resolve, reject) => {
      session.on('error', reject)
      const stream = session.request({ ':path': '/' })
      stream.on('response', (headers) => resolve(Number(headers[':status'])))
      stream.resume()
    })
    session.close()
    t.equal(status, 401, `${name}: HTTP/2`)
  }
  const good = await leafFor(agent, 'web')
  t.equal((await get(mtlsClient(t, good), `${svc.origin}/`)).status, 200, 'the canonical leaf the agent issues is served')
})

t.test('mode \'agent\': the route override decides the routed spelling in its own right too (docs/semantics.md#paths-agent-mode)', async (t) => {
  const policy = compilePolicy({ destination: 'api', intentions: [], defaultAllow: false, protocol: 'http' })
  const override = compileOverride([{ name: 'web', permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/open' } }] } as never])
  const service = { policy, normalization: null, router: D, agentDecides: true }
  const decideUrl = (url: string): string => decideRequest(service, { exempt: false, override },
    { caller: { partition: '', namespace: 'default', service: 'web' }, method: 'GET', url, rawHeaders: [] }, newVerdict()).outcome
  t.equal(decideUrl('/open/x'), 'allow')
  t.equal(decideUrl('/files/../open/x'), 'deny', 'canonical /open/x is allowed, the routed /files/../open/x is not (no permission matched)')
  t.equal(decideUrl('/open/x'), 'allow')
  t.equal(decideRequest(service, { exempt: false, override },
    { caller: { partition: '', namespace: 'default', service: 'ops' }, method: 'GET', url: '/files/../open', rawHeaders: [] }, newVerdict()).outcome,
  'ask-agent', 'no override source for the caller: the agent decides')
})
