// Service to service through the decorators: `web` (a Fastify app with the plugin) calls `api`
// (another one) with fastify.consulNative.fetch and .dispatcher, over verified mTLS.
import t from 'tap'
import { request } from 'undici'
import { agentCall, setIntentions, setProtocol, startAgent, startService } from './helpers/mesh'

t.test('web calls api through fetch() and dispatcher(); api\'s intentions decide', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/v1/', Methods: ['GET'] } }] }])
  await startService(t, agent, { plugin: { register: { check: 'tcp', checkInterval: '1s' } } })
  let index = 0
  for (;;) {
    const res = await agentCall(agent, 'GET', `/v1/health/connect/api?passing${index > 0 ? `&index=${index}&wait=5s` : ''}`)
    if (Array.isArray(res.body) && res.body.length === 1) break
    index = Number(res.headers['x-consul-index'])
  }
  const web = await startService(t, agent, {
    plugin: { service: 'web' },
    routes (app) {
      app.get('/relay/*', { config: { consulNative: false } }, async (req, reply) => {
        const target = `/${(req.params as { '*': string })['*']}`
        const res = await app.consulNative.fetch('api', target)
        reply.code(res.status)
        return await res.json()
      })
      app.get('/dispatch', { config: { consulNative: false } }, async () => {
        const res = await request('https://api.service.consul/v1/items/9', { dispatcher: app.consulNative.dispatcher('api') })
        return await res.body.json()
      })
    }
  })
  const anonymous = { rejectUnauthorized: false }
  const call = async (path: string): Promise<{ status: number, body: any }> => {
    const { Agent } = await import('undici')
    const client = new Agent({ connect: anonymous })
    const res = await request(`${web.origin}${path}`, { dispatcher: client })
    const body = await res.body.json()
    await client.close()
    return { status: res.statusCode, body }
  }
  const allowed = await call('/relay/whoami')
  t.equal(allowed.status, 403, '/whoami is outside the allowed prefix')
  const items = await call('/relay/v1/items/7')
  t.equal(items.status, 200)
  t.same(items.body, { id: '7' })
  t.same((await call('/dispatch')).body, { id: '9' }, 'the dispatcher works with undici.request')
  const missing = await call('/relay/v1/nope')
  t.equal(missing.status, 404, 'allowed by intentions, unknown to api')
})

t.test('calls keep working across an instance restart', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const passingInstances = async (predicate: (ports: number[]) => boolean): Promise<void> => {
    let index = 0
    for (;;) {
      const res = await agentCall(agent, 'GET', `/v1/health/connect/api?passing${index > 0 ? `&index=${index}&wait=5s` : ''}`)
      if (predicate((res.body as Array<{ Service: { Port: number } }>).map((entry) => entry.Service.Port))) return
      index = Number(res.headers['x-consul-index'])
    }
  }
  const first = await startService(t, agent, { plugin: { register: { check: 'tcp', checkInterval: '1s' } } })
  await passingInstances((ports) => ports.includes(first.port))
  const web = await startService(t, agent, { plugin: { service: 'web' } })
  t.equal((await web.app.consulNative.fetch('api', '/v1/items/1')).status, 200)

  // A rolling restart: the new instance is up before the old one leaves. Whether web's discovery
  // has seen the departure yet or not, the call succeeds (a refused connection is retried).
  const second = await startService(t, agent, { plugin: { register: { check: 'tcp', checkInterval: '1s' } } })
  await passingInstances((ports) => ports.includes(second.port))
  await first.app.close()
  await passingInstances((ports) => ports.length === 1 && ports[0] === second.port)
  const res = await web.app.consulNative.fetch('api', '/v1/items/2')
  t.equal(res.status, 200, 'the new instance answers')
  t.same(await res.json(), { id: '2' })
})
