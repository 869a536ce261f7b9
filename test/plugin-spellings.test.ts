// Security review classes (docs/semantics.md#paths-guarantees): a request the intentions deny never
// reaches a handler, whatever its spelling, over HTTP/1.1 (undici) and HTTP/2 (node:http2), both
// with the caller's certificate over real TLS. Each case names the class it covers.
import t from 'tap'
import type { Test } from 'tap'
import http2 from 'node:http2'
import { once } from 'node:events'
import Fastify from 'fastify'
import type { FastifyInstance, FastifyServerOptions } from 'fastify'
import consulNative, { httpsOptions } from '../lib/index'
import type { ConsulNativeOptions, RouteConsulNativeConfig } from '../lib/index'
import type { DevAgent } from '../lib/dev-agent/index'
import { get, leafFor, mtlsClient, setIntentions, setProtocol, startAgent, startService } from './helpers/mesh'
import type { Credentials } from './helpers/mesh'

const PATH_RULES = [
  {
    Name: 'web',
    Permissions: [
      { Action: 'deny', HTTP: { PathExact: '/admin' } },
      { Action: 'deny', HTTP: { PathPrefix: '/kv' } },
      { Action: 'deny', HTTP: { PathPrefix: '/café' } },
      { Action: 'deny', HTTP: { PathExact: '/tag/c++' } },
      { Action: 'deny', HTTP: { PathPrefix: '/u/admin@' } },
      { Action: 'deny', HTTP: { PathPrefix: '/static/private/' } },
      { Action: 'allow', HTTP: { PathPrefix: '/' } }
    ]
  }
]

interface Served { app: FastifyInstance, origin: string, ran: string[] }

/** Routes that record every handler run: a denied request must leave `ran` untouched. */
function declareRoutes (app: FastifyInstance, ran: string[]): void {
  const handler = async (request: { url: string, params: unknown }): Promise<unknown> => {
    ran.push(request.url)
    return { ran: true, params: request.params }
  }
  app.get('/admin', handler)
  app.get('/kv/*', handler)
  app.get('/café/*', handler)
  app.get('/tag/:name', handler)
  app.get('/u/:user', handler)
  app.get('/static/*', handler)
  app.get('/*', handler)
}

async function serve (t: Tap, agent: DevAgent, fastify: FastifyServerOptions, plugin: Partial<ConsulNativeOptions> = {},
  routes: (app: FastifyInstance, ran: string[]) => void = declareRoutes): Promise<Served> {
  const app = Fastify({ ...fastify, http2: true, https: httpsOptions({ allowHTTP1: true }) } as FastifyServerOptions) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  const ran: string[] = []
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, ...plugin })
  routes(app, ran)
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, origin: `https://127.0.0.1:${(app.server.address() as { port: number }).port}`, ran }
}

type Tap = Test

/** One HTTP/2 request with a client certificate; `:path` is sent as given (one byte per char). */
async function h2get (creds: Credentials, origin: string, path: string): Promise<number> {
  const session = http2.connect(origin, { ...creds, checkServerIdentity: () => undefined })
  try {
    return await new Promise<number>((resolve, reject) => {
      session.on('error', reject)
      const stream = session.request({ ':path': path })
      stream.on('response', (headers) => resolve(Number(headers[':status'])))
      stream.on('error', reject)
      stream.resume()
    })
  } finally {
    session.close()
  }
}

async function setup (t: Tap, sources: unknown[] = PATH_RULES): Promise<{ agent: DevAgent, creds: Credentials }> {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', sources)
  return { agent, creds: await leafFor(agent, 'web') }
}

/** Sends `path` over both protocols and checks the status of each, and that no denied request ran a handler. */
async function expectBoth (t: Tap, svc: Served, creds: Credentials, path: string, status: number | [number, number], name: string): Promise<void> {
  const client = mtlsClient(t, creds)
  const before = svc.ran.length
  const h1 = (await get(client, `${svc.origin}${path}`)).status
  const h2 = await h2get(creds, svc.origin, path)
  const expected = Array.isArray(status) ? status : [status, status]
  t.same([h1, h2], expected, `${name}: ${JSON.stringify(path)} → ${expected.join('/')} over HTTP/1.1 and HTTP/2`)
  if (!expected.includes(200)) t.equal(svc.ran.length, before, `${name}: no handler ran`)
}

t.test('class 3: Unicode case folding is computed on the decoded path, as the router folds it', async (t) => {
  const { agent, creds } = await setup(t)
  for (const [name, fastify] of [
    ['top-level caseSensitive', { caseSensitive: false }],
    ['routerOptions.caseSensitive', { routerOptions: { caseSensitive: false } }]
  ] as const) {
    const svc = await serve(t, agent, fastify as FastifyServerOptions)
    await expectBoth(t, svc, creds, '/%E2%84%AAv/secret', 403, `${name}: KELVIN SIGN folds to k`)
    await expectBoth(t, svc, creds, '/%E2%84%AAV/secret', 403, `${name}: KELVIN SIGN then upper-case V`)
    await expectBoth(t, svc, creds, '/KV/secret', 403, `${name}: ASCII upper case`)
    await expectBoth(t, svc, creds, '/ADMIN', 403, `${name}: the exact deny in upper case`)
    await expectBoth(t, svc, creds, '/kx/open', 200, `${name}: other paths are served`)
  }
})

t.test('class 4: router options are read where the router reads them, in every combination of spellings', async (t) => {
  const { agent, creds } = await setup(t)
  const probes = {
    ignoreTrailingSlash: ['/admin/', true],
    ignoreDuplicateSlashes: ['//admin', true],
    caseSensitive: ['/ADMIN', false],
    useSemicolonDelimiter: ['/admin;jsessionid=1', true]
  } as const
  for (const [key, [path, widened]] of Object.entries(probes)) {
    const spellings: Array<[string, Record<string, unknown>, boolean]> = [
      ['top-level only', { [key]: widened }, true],
      ['routerOptions only', { routerOptions: { [key]: widened } }, true],
      ['top-level, with routerOptions for another key', { [key]: widened, routerOptions: { maxParamLength: 100 } }, true],
      ['top-level, overridden by routerOptions', { [key]: widened, routerOptions: { [key]: !widened } }, false],
      ['routerOptions, over the top-level default', { [key]: !widened, routerOptions: { [key]: widened } }, true]
    ]
    for (const [name, fastify, effective] of spellings) {
      const svc = await serve(t, agent, fastify as FastifyServerOptions)
      // In force: the spelling reaches the /admin handler and must be denied. Not in force: it
      // reaches the catch-all as a different path, which the intentions allow.
      await expectBoth(t, svc, creds, path, effective ? 403 : 200, `${key} (${name})`)
      await svc.app.close()
    }
  }
})

t.test('class 5: mode \'agent\' route overrides apply the same spelling rules', async (t) => {
  const { agent, creds } = await setup(t, [{ Name: 'web', Action: 'allow' }])
  const override: { config: { consulNative: RouteConsulNativeConfig } } = {
    config: {
      consulNative: {
        sources: [{ name: 'web', permissions: [{ action: 'deny', http: { pathExact: '/admin' } }, { action: 'allow', http: { pathPrefix: '/' } }] }]
      }
    }
  }
  const svc = await serve(t, agent, { routerOptions: { caseSensitive: false, ignoreDuplicateSlashes: true, ignoreTrailingSlash: true } } as FastifyServerOptions,
    { mode: 'agent' }, (app, ran) => {
      app.get('/admin', override, async () => { ran.push('/admin'); return { ran: true } })
      app.get('/files/*', override, async () => { ran.push('/files'); return { ran: true } })
    })
  for (const path of ['/admin', '/ADMIN', '//admin', '/admin/', '/%41dmin', '/files/../admin']) {
    await expectBoth(t, svc, creds, path, 403, 'the override\'s deny')
  }
  await expectBoth(t, svc, creds, '/files/a', 200, 'the override\'s allow')
})

t.test('class 6: non-ASCII path rules are compared percent-encoded, and warned about at load', async (t) => {
  const { agent, creds } = await setup(t)
  const lines: Array<Record<string, any>> = []
  const svc = await serve(t, agent, { logger: { level: 'warn', stream: { write: (line: string) => { lines.push(JSON.parse(line)) } } } } as FastifyServerOptions)
  await expectBoth(t, svc, creds, '/caf%C3%A9/menu', 403, 'UTF-8 escapes')
  await expectBoth(t, svc, creds, '/caf%c3%a9/menu', 403, 'lower-case escapes')
  // Node's HTTP/1.1 parser refuses raw non-ASCII bytes in the target; HTTP/2 carries them.
  await expectBoth(t, svc, creds, '/caf\u00c3\u00a9/menu', [400, 403], 'raw UTF-8 bytes in the target')
  await expectBoth(t, svc, creds, '/CAF%C3%A9/menu', 200, 'another path (case-sensitive router)')
  await expectBoth(t, svc, creds, '/cafe/menu', 200, 'another path')
  const warning = lines.find((line) => line.consulNative?.event === 'intention-unsupported' && String(line.msg).includes('/caf%C3%A9'))
  t.match(warning?.msg, /PathPrefix "\/café" is compared as "\/caf%C3%A9"/, 'the rule is named with its encoded spelling')
})

t.test('class 7: reserved escapes in route parameters are decided on the decoded parameter too', async (t) => {
  const { agent, creds } = await setup(t)
  const svc = await serve(t, agent, {})
  await expectBoth(t, svc, creds, '/tag/c%2B%2B', 403, 'a + that the parameter decodes')
  await expectBoth(t, svc, creds, '/tag/c%2b%2B', 403, 'mixed-case escapes')
  await expectBoth(t, svc, creds, '/u/admin%40corp', 403, 'an @')
  await expectBoth(t, svc, creds, '/static/private%2Fkey', 403, 'an escaped slash in a wildcard')
  await expectBoth(t, svc, creds, '/static/public%2F..%2Fprivate%2Fkey', 403, 'escaped dot segments in a wildcard')
  await expectBoth(t, svc, creds, '/tag/rust', 200, 'other parameters are served')
  await expectBoth(t, svc, creds, '/tag/c%2B', 200, 'and other escapes')
  await expectBoth(t, svc, creds, '/static/public%2Fkey', 200, 'and other escaped slashes')
})

t.test('class 8: routes declared before the plugin get the prefixed-root twin; declaration order changes nothing', async (t) => {
  for (const deny of ['/admin', '/admin/']) {
    const { agent, creds } = await setup(t, [{ Name: 'web', Permissions: [{ Action: 'deny', HTTP: { PathExact: deny } }, { Action: 'allow', HTTP: { PathPrefix: '/' } }] }])
    for (const order of ['before', 'after'] as const) {
      const app = Fastify({ http2: true, https: httpsOptions({ allowHTTP1: true }) } as FastifyServerOptions) as unknown as FastifyInstance
      t.teardown(async () => await app.close())
      const ran: string[] = []
      const routes = async (child: FastifyInstance): Promise<void> => {
        child.get('/', async () => { ran.push('/admin'); return { ran: true } })
      }
      const other = async (child: FastifyInstance): Promise<void> => {
        child.get('/', async () => { ran.push('/open'); return { ran: true } })
      }
      if (order === 'before') await app.register(routes, { prefix: '/admin' })
      await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
      if (order === 'after') await app.register(routes, { prefix: '/admin' })
      await app.register(other, { prefix: '/open' })
      await app.listen({ port: 0, host: '127.0.0.1' })
      const svc = { app, origin: `https://127.0.0.1:${(app.server.address() as { port: number }).port}`, ran }
      for (const path of ['/admin', '/admin/']) await expectBoth(t, svc, creds, path, 403, `deny ${deny}, routes declared ${order} the plugin`)
      for (const path of ['/open', '/open/']) await expectBoth(t, svc, creds, path, 200, `routes declared ${order} the plugin`)
      await app.close()
    }
  }
})

t.test('a route declared before the plugin at /x with a separate /x/ route is treated as a twin (fail closed)', async (t) => {
  const { agent, creds } = await setup(t, [{ Name: 'web', Permissions: [{ Action: 'deny', HTTP: { PathExact: '/x/' } }, { Action: 'allow', HTTP: { PathPrefix: '/' } }] }])
  const app = Fastify({ http2: true, https: httpsOptions({ allowHTTP1: true }) } as FastifyServerOptions) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  const ran: string[] = []
  app.get('/x', async () => { ran.push('/x'); return { ran: true } })
  app.get('/x/', async () => { ran.push('/x/'); return { ran: true } })
  await app.register(consulNative, { service: 'api', agent: { address: agent.address } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const svc = { app, origin: `https://127.0.0.1:${(app.server.address() as { port: number }).port}`, ran }
  await expectBoth(t, svc, creds, '/x', 403, 'the documented limit: both spellings count as one route')
})

t.test('failure 10: an RE2 program above a bound set with maxRegexProgramSize rejects the whole intention update; the default (Consul\'s bound for Envoy) accepts it', async (t) => {
  const { agent, creds } = await setup(t, [{ Name: 'web', Action: 'allow' }])
  const big = [{ Name: 'web', Permissions: [{ Action: 'deny', HTTP: { PathRegex: '/api/.{0,1000}.{0,1000}x' } }, { Action: 'allow', HTTP: { PathPrefix: '/' } }] }]
  const strict = await serve(t, agent, {}, { maxRegexProgramSize: 100 })
  const raised = await serve(t, agent, {})
  const rejected = once(strict.app.consulNative.events, 'sync-error')
  const applied = once(raised.app.consulNative.events, 'intentions')
  await setIntentions(agent, 'api', big)
  const [{ error }] = await rejected
  t.equal(error.code, 'FST_CONSUL_NATIVE_INVALID_INTENTIONS')
  t.match(error.message, /RE2 program of size \d+, above the limit of 100/)
  await applied
  await expectBoth(t, strict, creds, '/api/abcx', 200, 'the last good intentions stay in force')
  await expectBoth(t, raised, creds, '/api/abcx', 403, 'with the default bound the update applies')
})

t.test('class 6 in a route override: compared percent-encoded, and warned about when the route is declared', async (t) => {
  const { agent, creds } = await setup(t, [{ Name: 'web', Action: 'allow' }])
  const lines: Array<Record<string, any>> = []
  const svc = await serve(t, agent, { logger: { level: 'warn', stream: { write: (line: string) => { lines.push(JSON.parse(line)) } } } } as FastifyServerOptions,
    {}, (app, ran) => {
      const config = { consulNative: { sources: [{ name: 'web', permissions: [{ action: 'deny', http: { pathPrefix: '/café' } }, { action: 'allow', http: { pathPrefix: '/' } }] }] } } as const
      app.get('/*', { config: config as unknown as { consulNative: RouteConsulNativeConfig } }, async () => { ran.push('/*'); return { ran: true } })
    })
  await expectBoth(t, svc, creds, '/caf%C3%A9', 403, 'the override\'s deny')
  await expectBoth(t, svc, creds, '/cafe', 200, 'the override\'s allow')
  const warning = lines.find((line) => line.consulNative?.event === 'route-path-rule')
  t.match(warning?.msg, /route GET \/\*: sources\[0\], permission 1: PathPrefix "\/café" is compared as "\/caf%C3%A9"/)
})

t.test('Fastify\'s rewriteUrl: the target as sent decides, and the rewritten one can only add a denial (docs/semantics.md#paths-rewrite)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{
    Name: 'web',
    Permissions: [
      { Action: 'deny', HTTP: { PathPrefix: '/api/v1/admin' } },
      { Action: 'deny', HTTP: { PathPrefix: '/internal' } },
      { Action: 'deny', HTTP: { Header: [{ Name: ':path', Prefix: '/secret' }] } },
      { Action: 'allow', HTTP: { PathPrefix: '/api/' } }
    ]
  }])
  const ran: string[] = []
  const svc = await startService(t, agent, {
    fastify: {
      rewriteUrl: (req) => {
        const url = req.url as string
        if (url === '/fragment') return '/items#x'
        if (url === '/bad') return '/items%00'
        if (url.startsWith('/api/pub/')) return url.slice(8)
        return url.startsWith('/api/v1/') ? url.slice(7) : url
      }
    },
    routes: (app) => {
      for (const path of ['/admin/users', '/internal/x', '/items', '/secret']) app.get(path, async (request) => { ran.push(request.url); return 'ok' })
    }
  })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(web, `${svc.origin}/api/v1/items`)).status, 200, 'allowed as sent (/api/...), though routed as /items')
  t.equal((await get(web, `${svc.origin}/api/v1/admin/users`)).status, 403, 'denied as sent')
  t.equal((await get(web, `${svc.origin}/api/v1/internal/x`)).status, 403, 'denied as rewritten')
  t.equal((await get(web, `${svc.origin}/api/pub/secret`)).status, 403, 'a :path matcher reads the rewritten spelling too')
  t.equal((await get(web, `${svc.origin}/fragment`)).status, 400, 'a rewritten target with a fragment is refused')
  t.equal((await get(web, `${svc.origin}/bad`)).status, 400, 'and one the normalization refuses')
  t.same(ran, ['/items'], 'only the allowed handler ran')
})
