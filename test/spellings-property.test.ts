// Property (docs/semantics.md#paths-guarantees): whatever the spelling of a request target and the
// router options, when Fastify's router (find-my-way, the real one) would hand the request to a
// handler that a deny covers, the one pure request decision denies it.
import t from 'tap'
import fc from 'fast-check'
import FindMyWay from 'find-my-way'
import type { Intention } from '../lib/agent/wire'
import type { RouterOptions } from '../lib/intentions/path'
import { compilePolicy } from '../lib/intentions/policy'
import { decideRequest, newVerdict } from '../lib/intentions/request'

const WEB = { partition: 'default', namespace: 'default', service: 'web' }
const INTENTIONS: Intention[] = [{
  SourceName: 'web',
  SourceNS: 'default',
  DestinationName: 'api',
  DestinationNS: 'default',
  Precedence: 9,
  Action: '',
  Permissions: [
    { Action: 'deny', HTTP: { PathExact: '/admin' } },
    { Action: 'deny', HTTP: { PathPrefix: '/kv/' } },
    { Action: 'deny', HTTP: { PathExact: '/tag/c++' } },
    { Action: 'deny', HTTP: { PathPrefix: '/files/secret/' } },
    { Action: 'allow', HTTP: { PathPrefix: '/' } }
  ]
} as unknown as Intention]
const POLICY = compilePolicy({ destination: 'api', intentions: INTENTIONS, defaultAllow: false, protocol: 'http' })

type Route = 'admin' | 'kv' | 'tag' | 'files' | 'other'

/** The handler the real router picks, and whether what it hands over is something a deny covers. */
function covered (router: ReturnType<typeof FindMyWay>, url: string): boolean {
  const found = router.find('GET', url) as { handler: () => Route, params: Record<string, string> } | null
  if (found === null) return false
  const route = found.handler()
  if (route === 'admin' || route === 'kv') return true
  if (route === 'tag') return found.params.name === 'c++'
  if (route === 'files') return found.params['*'].startsWith('secret/')
  return false
}

const hex = (c: string, upper: boolean): string => {
  let out = ''
  for (const b of Buffer.from(c, 'utf8')) {
    const h = b.toString(16).padStart(2, '0')
    out += '%' + (upper ? h.toUpperCase() : h)
  }
  return out
}

/** One character of a path, spelled one of the ways a client may write it. */
const spelledChar = (c: string): fc.Arbitrary<string> => {
  const ways: Array<fc.Arbitrary<string>> = [fc.constant(c), fc.constant(hex(c, true)), fc.constant(hex(c, false))]
  if (/[a-z]/.test(c)) ways.push(fc.constant(c.toUpperCase()), fc.constant(hex(c.toUpperCase(), true)))
  if (c === 'k') ways.push(fc.constant('%E2%84%AA')) // KELVIN SIGN, lower-cased to 'k' by toLowerCase
  if (c === '/') ways.push(fc.constant('//'))
  return fc.oneof(...ways)
}

const spelling = fc.constantFrom('/admin', '/kv/x', '/tag/c++', '/files/secret/key').chain((base) =>
  fc.tuple(
    fc.tuple(...[...base].map((c, i) => i === 0 ? fc.constant(c) : spelledChar(c))).map((parts) => parts.join('')),
    fc.constantFrom('', '/', '/.', ';jsessionid=1', ';x/'),
    fc.constantFrom('', '?q=1', '#f'),
    fc.constantFrom('', '/x/..', '/./', '/kv/../files')
  ).map(([path, tail, query, lead]) => lead === '' ? path + tail + query : lead + path + tail + query)
)

const routerOptions: fc.Arbitrary<RouterOptions> = fc.record({
  ignoreTrailingSlash: fc.boolean(),
  ignoreDuplicateSlashes: fc.boolean(),
  caseSensitive: fc.boolean(),
  useSemicolonDelimiter: fc.boolean()
})

t.test('no spelling the router hands to a denied handler is allowed', async (t) => {
  let reached = 0
  fc.assert(fc.property(routerOptions, spelling, (options, url) => {
    const router = FindMyWay(options)
    router.on('GET', '/admin', () => 'admin')
    router.on('GET', '/kv/*', () => 'kv')
    router.on('GET', '/tag/:name', () => 'tag')
    router.on('GET', '/files/*', () => 'files')
    router.on('GET', '/*', () => 'other')
    if (!covered(router, url)) return true
    reached++
    const verdict = decideRequest({ policy: POLICY, normalization: null, router: options, agentDecides: false },
      { exempt: false, override: null }, { caller: WEB, method: 'GET', url, rawHeaders: [] }, newVerdict())
    return verdict.outcome === 'deny' || verdict.outcome === 'bad-path'
  }), { numRuns: 3000 })
  t.ok(reached > 500, `many generated spellings reach a denied handler (${reached}), so the property is exercised`)
})
