// JWT requirements enforced per request over real mTLS (docs/semantics.md#jwt): permission-level
// and top-level requirements, providers as alternatives, claims, no fall-through, default allow,
// token locations, forwarding, request.consulJwt, and a provider Consul no longer has.
import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { agentCall, get, leafFor, logLines, mtlsClient, setIntentions, setProtocol, startAgent, startService } from './helpers/mesh'
import { newIssuer, localProvider } from './helpers/jwt'

const bearer = (token: string): Record<string, string> => ({ authorization: `Bearer ${token}` })

async function putEntry (agent: Parameters<typeof agentCall>[0], entry: unknown): Promise<void> {
  const res = await agentCall(agent, 'PUT', '/v1/config', entry)
  if (res.status !== 200) throw new Error(`PUT /v1/config: ${res.status} ${JSON.stringify(res.body)}`)
}

function jwtRoutes (app: FastifyInstance): void {
  const echo = async (request: { headers: Record<string, unknown>, consulJwt: unknown }): Promise<unknown> =>
    ({ jwt: request.consulJwt, authorization: request.headers.authorization ?? null, payload: request.headers['x-jwt-payload'] ?? null })
  app.get('/v1/*', echo)
  app.get('/public/*', echo)
  app.get('/', echo)
}

t.test('permission-level requirements: the rules of docs/semantics.md#jwt-match as a table', async (t) => {
  const okta = await newIssuer('ES256')
  const auth0 = await newIssuer('RS256', 'https://auth0.test')
  const stranger = await newIssuer('ES256')
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await putEntry(agent, localProvider('okta', [okta], { Audiences: ['api'] }))
  await putEntry(agent, localProvider('auth0', [auth0], {
    Issuer: 'https://auth0.test',
    Locations: [{ Cookie: { Name: 'session' } }, { QueryParam: { Name: 'token' } }]
  }))
  await setIntentions(agent, 'api', [
    {
      Name: 'web',
      Permissions: [
        { Action: 'allow', HTTP: { PathPrefix: '/v1/' }, JWT: { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: ['role'], Value: 'admin' }] }] } },
        { Action: 'allow', HTTP: { PathPrefix: '/public/' } }
      ]
    },
    {
      Name: 'ops',
      Permissions: [{
        Action: 'allow',
        HTTP: { PathPrefix: '/' },
        JWT: { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: ['org', 'team'], Value: 'a' }] }, { Name: 'auth0' }] }
      }]
    },
    { Name: '*', Action: 'allow' }
  ])
  const { lines, stream } = logLines()
  // Every denial of the table is logged (the default logDenials limit would leave repeats out).
  const svc = await startService(t, agent, { routes: jwtRoutes, plugin: { logDenials: { sample: 1, perSecond: 10_000 } }, fastify: { logger: { level: 'info', stream } } as never })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const ops = mtlsClient(t, await leafFor(agent, 'ops'))
  const cron = mtlsClient(t, await leafFor(agent, 'cron'))

  const admin = await okta.sign({ role: 'admin' })
  const now = Math.floor(Date.now() / 1000)
  const cases: Array<[string, typeof web, string, Record<string, string>, number, string?]> = [
    ['valid token with the claim', web, '/v1/items', bearer(admin), 200],
    ['missing token', web, '/v1/items', {}, 403, 'no token in the request'],
    ['expired beyond the 30 s skew', web, '/v1/items', bearer(await okta.sign({ role: 'admin', exp: now - 60 })), 403, 'token expired'],
    ['expired within the 30 s skew', web, '/v1/items', bearer(await okta.sign({ role: 'admin', exp: now - 5 })), 200],
    ['not yet valid', web, '/v1/items', bearer(await okta.sign({ role: 'admin', nbf: now + 120 })), 403, 'token not yet valid (nbf)'],
    ['wrong iss', web, '/v1/items', bearer(await okta.sign({ role: 'admin', iss: 'https://evil.test' })), 403, 'iss is not the provider\'s Issuer'],
    ['wrong aud', web, '/v1/items', bearer(await okta.sign({ role: 'admin', aud: 'billing' })), 403, 'aud is not among the provider\'s Audiences'],
    ['aud list naming api', web, '/v1/items', bearer(await okta.sign({ role: 'admin', aud: ['billing', 'api'] })), 200],
    ['wrong key under the right kid', web, '/v1/items', bearer(await stranger.sign({ role: 'admin' }, { kid: okta.kid })), 403, 'bad signature'],
    ['unknown key', web, '/v1/items', bearer(await stranger.sign({ role: 'admin' })), 403, 'no key of the key set matches the token'],
    ['malformed token', web, '/v1/items', bearer('not.a.jwt'), 403, 'malformed token'],
    ['alg none', web, '/v1/items', bearer(`${Buffer.from('{"alg":"none"}').toString('base64url')}.${Buffer.from('{"iss":"https://idp.test","role":"admin"}').toString('base64url')}.`), 403],
    ['claim mismatch', web, '/v1/items', bearer(await okta.sign({ role: 'user' })), 403, 'claim "role" does not match VerifyClaims'],
    ['array claim holding the value', web, '/v1/items', bearer(await okta.sign({ role: ['user', 'admin'] })), 200],
    ['array claim without the value', web, '/v1/items', bearer(await okta.sign({ role: ['user'] })), 403],
    ['a number never equals a string', web, '/v1/items', bearer(await okta.sign({ role: 1 })), 403],
    ['no fall-through to the * allow: a failed requirement leaves the default (deny)', web, '/v1/x', {}, 403],
    ['another permission needs no token', web, '/public/a', {}, 200],
    ['nested claim', ops, '/', bearer(await okta.sign({ org: { team: 'a' } })), 200],
    ['nested claim mismatch', ops, '/', bearer(await okta.sign({ org: { team: 'b' } })), 403, 'claim "org.team" does not match VerifyClaims'],
    ['nested claim path through a non-object', ops, '/', bearer(await okta.sign({ org: 'a' })), 403],
    ['the second provider suffices (cookie)', ops, '/', { cookie: `theme=dark; session=${await auth0.sign()}` }, 200],
    ['the second provider suffices (query)', ops, `/?token=${await auth0.sign()}`, {}, 200],
    ['a token for the other provider in its location does not count', ops, '/', bearer(await auth0.sign()), 403],
    ['callers without requirements need no token', cron, '/v1/items', {}, 200]
  ]
  for (const [name, client, path, headers, status, reason] of cases) {
    const before = lines.length
    const res = await get(client, `${svc.origin}${path}`, { headers })
    t.equal(res.status, status, name)
    if (status === 403) {
      t.equal(res.body.code, 'FST_CONSUL_NATIVE_DENIED', `${name}: 403, never 401`)
      const denied = lines.slice(before).find((l) => l.consulNative?.event === 'denied')
      t.ok(denied, `${name}: logged`)
      if (reason !== undefined) t.match(denied.consulNative.jwt, { okta: reason }, `${name}: the log says which provider failed and why`)
      t.notMatch(JSON.stringify(lines.slice(before)), /eyJ/, `${name}: the token is never logged`)
    }
  }
  const allowed = await get(web, `${svc.origin}/v1/items`, { headers: bearer(admin) })
  t.same(allowed.body.jwt.okta.role, 'admin', 'request.consulJwt holds the verified payload by provider')
  t.equal(allowed.body.authorization, null, 'Forward false (the default): the token header is removed before the handler')
  const both = await get(ops, `${svc.origin}/?token=${await auth0.sign()}`, { headers: bearer(await okta.sign({ org: { team: 'a' } })) })
  t.same(Object.keys(both.body.jwt).sort(), ['auth0', 'okta'], 'every provider asked for and verified is on request.consulJwt')
})

t.test('a top-level requirement is ANDed with the source, and with a permission\'s own', async (t) => {
  const okta = await newIssuer('EdDSA')
  const auth0 = await newIssuer('PS256', 'https://auth0.test')
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await putEntry(agent, localProvider('okta', [okta]))
  await putEntry(agent, localProvider('auth0', [auth0], { Issuer: 'https://auth0.test', Locations: [{ Header: { Name: 'x-auth0' } }] }))
  await putEntry(agent, {
    Kind: 'service-intentions',
    Name: 'api',
    JWT: { Providers: [{ Name: 'okta', VerifyClaims: [{ Path: ['role'], Value: 'admin' }] }] },
    Sources: [
      { Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/v1/' }, JWT: { Providers: [{ Name: 'auth0' }] } }] },
      { Name: 'batch', Action: 'allow' },
      { Name: '*', Action: 'allow' }
    ]
  })
  const svc = await startService(t, agent, { routes: jwtRoutes })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const batch = mtlsClient(t, await leafFor(agent, 'batch'))
  const top = bearer(await okta.sign({ role: 'admin' }))
  const perm = { 'x-auth0': await auth0.sign() }
  t.equal((await get(web, `${svc.origin}/v1/a`, { headers: { ...top, ...perm } })).status, 200, 'both hold')
  t.equal((await get(web, `${svc.origin}/v1/a`, { headers: top })).status, 403, 'the permission\'s requirement fails')
  t.equal((await get(web, `${svc.origin}/v1/a`, { headers: perm })).status, 403, 'the top-level requirement fails')
  t.equal((await get(batch, `${svc.origin}/v1/a`, { headers: top })).status, 200, 'L4 allow with the top-level token')
  t.equal((await get(batch, `${svc.origin}/v1/a`)).status, 403, 'L4 allow without it: the default decides')
  t.equal((await get(mtlsClient(t, await leafFor(agent, 'cron')), `${svc.origin}/v1/a`)).status, 403, 'the top-level requirement applies to every source')
})

t.test('default allow: an allow\'s requirement is not enforced; a deny applies only with a token (as Consul)', async (t) => {
  const okta = await newIssuer('ES384')
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  await setProtocol(agent, 'api', 'http')
  await putEntry(agent, localProvider('okta', [okta]))
  await putEntry(agent, {
    Kind: 'service-intentions',
    Name: 'api',
    JWT: { Providers: [{ Name: 'okta' }] },
    Sources: [{ Name: 'web', Action: 'allow' }, { Name: 'billing', Action: 'deny' }]
  })
  const svc = await startService(t, agent, { routes: jwtRoutes })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const billing = mtlsClient(t, await leafFor(agent, 'billing'))
  const token = bearer(await okta.sign())
  t.equal((await get(web, `${svc.origin}/`)).status, 200, 'allow without a token')
  t.equal((await get(web, `${svc.origin}/`, { headers: token })).status, 200, 'allow with one')
  t.equal((await get(billing, `${svc.origin}/`, { headers: token })).status, 403, 'deny with a valid token')
  t.equal((await get(billing, `${svc.origin}/`)).status, 200, 'deny without one: the requirement fails and the default (allow) decides')
})

t.test('token locations, forwarding, and a provider Consul no longer has', async (t) => {
  const okta = await newIssuer('ES512')
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await putEntry(agent, localProvider('okta', [okta], {
    Locations: [{ Header: { Name: 'X-Token', ValuePrefix: 'Token ', Forward: true } }, { QueryParam: { Name: 'jwt' } }, { Cookie: { Name: 'jwt' } }],
    Forwarding: { HeaderName: 'X-JWT-Payload' }
  }))
  await putEntry(agent, localProvider('gone', [okta]))
  await putEntry(agent, localProvider('padded', [okta], { Forwarding: { HeaderName: 'X-JWT-Payload', PadForwardPayloadHeader: true } }))
  await setIntentions(agent, 'api', [
    { Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'okta' }] } }] },
    { Name: 'ops', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'gone' }, { Name: 'okta' }] } }] },
    { Name: 'batch', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'padded' }] } }] }
  ])
  const { lines, stream } = logLines()
  const routes = (app: FastifyInstance): void => {
    jwtRoutes(app)
    // A route-level source with a JWT block, in JavaScript spelling.
    app.get('/guarded', { config: { consulNative: { sources: [{ name: 'cron', action: 'allow', jwt: { providers: [{ name: 'okta', verifyClaims: [{ path: ['role'], value: 'x' }] }] } }] } } },
      async (request) => ({ jwt: request.consulJwt }))
  }
  const svc = await startService(t, agent, { routes, fastify: { logger: { level: 'info', stream } } as never })
  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const ops = mtlsClient(t, await leafFor(agent, 'ops'))
  const token = await okta.sign({ role: 'x' })
  const cron = mtlsClient(t, await leafFor(agent, 'cron'))
  const guarded = await get(cron, `${svc.origin}/guarded?jwt=${token}`)
  t.equal(guarded.status, 200, 'a route override\'s jwt block')
  t.equal(guarded.body.jwt.okta.role, 'x')
  t.equal((await get(cron, `${svc.origin}/guarded`)).status, 403, 'the override\'s requirement fails: the default (deny) decides')
  const payload = token.split('.')[1]

  const viaHeader = await get(web, `${svc.origin}/`, { headers: { 'x-token': `Token ${token}`, 'x-jwt-payload': 'forged' } })
  t.equal(viaHeader.status, 200, 'header with a value prefix')
  t.equal(viaHeader.body.payload, payload, 'Forwarding.HeaderName receives the base64url payload, replacing what the caller sent')
  const batch = mtlsClient(t, await leafFor(agent, 'batch'))
  const padded = await get(batch, `${svc.origin}/`, { headers: bearer(token) })
  t.equal(padded.status, 200)
  t.equal(padded.body.payload, payload + '='.repeat((4 - payload.length % 4) % 4), 'PadForwardPayloadHeader pads the forwarded payload')
  t.equal((await get(web, `${svc.origin}/?jwt=${token}`)).status, 200, 'query parameter')
  t.equal((await get(web, `${svc.origin}/`, { headers: { cookie: `jwt=${token}` } })).status, 200, 'cookie')
  t.equal((await get(web, `${svc.origin}/`, { headers: { 'x-token': token } })).status, 403, 'the value prefix is required')
  t.equal((await get(web, `${svc.origin}/`, { headers: bearer(token) })).status, 403, 'configured locations replace the defaults')
  // Node keeps the first value of a repeated header: the handler would read the forged token.
  const forgedFirst = `${token.split('.')[0]}.${Buffer.from('{"role":"admin"}').toString('base64url')}.`
  const twice = await get(web, `${svc.origin}/`, { headers: { 'x-token': [`token ${forgedFirst}`, `Token ${token}`] } })
  t.same([twice.status, twice.body.code], [400, 'FST_CONSUL_NATIVE_BAD_HEADER'], 'a token header sent twice is refused')
  const inQuery = await get(web, `${svc.origin}/?jwt=${forgedFirst}x&jwt=${token}`)
  t.same([inQuery.status, inQuery.body.code], [400, 'FST_CONSUL_NATIVE_BAD_HEADER'], 'and a token query parameter sent twice')
  t.match(lines.find((l) => l.consulNative?.event === 'bad-header')?.consulNative?.reason, /header "x-token" holding provider "okta"'s token is sent more than once/)
  const forged = await get(mtlsClient(t, await leafFor(agent, 'cron')), `${svc.origin}/`, { headers: { 'x-jwt-payload': 'forged' } })
  t.equal(forged.status, 403)

  // Consul lets a provider be deleted while intentions name it.
  const changed = new Promise((resolve) => svc.app.consulNative.events.once('intentions', resolve))
  t.equal((await agentCall(agent, 'DELETE', '/v1/config/jwt-provider/gone')).status, 200)
  await changed
  t.equal((await get(ops, `${svc.origin}/`, { headers: { 'x-token': `Token ${token}` } })).status, 200, 'the other provider still suffices')
  t.equal((await get(ops, `${svc.origin}/?x=1`)).status, 403)
  t.equal((await get(ops, `${svc.origin}/?x=2`)).status, 403)
  const missing = lines.filter((l) => l.consulNative?.event === 'jwt-provider-missing')
  t.equal(missing.length, 1, 'a missing provider is logged once')
  t.equal(missing[0].consulNative.provider, 'gone')
})
