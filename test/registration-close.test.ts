// close() while the registration is in flight never leaves the instance registered
// (docs/semantics.md#registration-close): the agent has acted on the PUT, and its answer is held
// by a proxy while the app (or the registration) is closed.
import t from 'tap'
import Fastify from 'fastify'
import consulNative, { httpsOptions } from '../lib/index'
import { buildRegistration, ServiceRegistration } from '../lib/registration'
import { startProxy } from './helpers/agent-proxy'
import type { AgentProxy, ProxiedCall } from './helpers/agent-proxy'
import { call, clientFor, Logs, startAgent } from './helpers/registration'

const isRegister = (c: ProxiedCall): boolean => c.method === 'PUT' && c.url.startsWith('/v1/agent/service/register')

/** Holds the agent's answer to the first registration until `release()`; resolves once the agent has registered it. */
function holdRegistration (proxy: AgentProxy): { registered: Promise<void>, release: () => void } {
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  let registered = (): void => {}
  const done = new Promise<void>((resolve) => { registered = resolve })
  proxy.holdAnswer = async (c) => {
    if (!isRegister(c)) return
    proxy.holdAnswer = null
    registered()
    await held
  }
  return { registered: done, release }
}

t.test('ServiceRegistration: deregister() during register() waits for its answer, then deregisters', async (t) => {
  const agent = await startAgent(t)
  const proxy = await startProxy(t, agent.address)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: false }, { address: '127.0.0.1', port: 9 }, null)
  const registration = new ServiceRegistration(clientFor(t, proxy.address), reg, logs.logger)
  const { registered, release } = holdRegistration(proxy)

  const registering = registration.register()
  await registered
  t.same(Object.keys((await call(agent, 'GET', '/v1/agent/services')).body), [reg.id], 'the agent has it; the client does not know yet')
  const deregistering = registration.deregister()
  await logs.waitFor('deregister-after-registration', 'debug')
  release()
  await registering
  await deregistering
  t.same((await call(agent, 'GET', '/v1/agent/services')).body, {}, 'not registered in the end')
  t.match(logs.events('deregistered', 'info'), [{ obj: { consulNative: { serviceId: reg.id, alreadyGone: false } } }])
  t.equal(registration.state.registered, false)
})

t.test('ServiceRegistration: a registration that got no answer is deregistered anyway', async (t) => {
  const agent = await startAgent(t)
  const proxy = await startProxy(t, agent.address)
  const logs = new Logs()
  const reg = buildRegistration('api', { check: false }, { address: '127.0.0.1', port: 9 }, null)
  const client = clientFor(t, proxy.address)
  const registration = new ServiceRegistration(client, reg, logs.logger)
  const { registered, release } = holdRegistration(proxy)
  t.teardown(release)

  // The client gives up on the answer (here: its connection is cut), after the agent registered it.
  const registering = registration.register().then(() => null, (e: unknown) => e)
  await registered
  proxy.cut(isRegister)
  t.match(await registering, { code: 'FST_CONSUL_NATIVE_REGISTER_FAILED' })
  await registration.deregister()
  t.same((await call(agent, 'GET', '/v1/agent/services')).body, {}, 'deregistered: the registration may have landed, and it had')

  // One the agent refused with a status needs no deregistration.
  const refused = new ServiceRegistration(client, { ...reg, body: { ...reg.body, Address: '0.0.0.0' } }, logs.logger)
  await t.rejects(refused.register(), { code: 'FST_CONSUL_NATIVE_REGISTER_FAILED' })
  await refused.deregister()
  t.equal(client.requests.filter((q) => q.path.startsWith('/v1/agent/service/deregister/')).length, 1, 'only the first was deregistered')
})

t.test('the plugin: app.close() while listen() is registering leaves no instance in the catalog', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const proxy = await startProxy(t, agent.address)
  const { registered, release } = holdRegistration(proxy)
  // The answer is released once the plugin waits for it, or once its client gave up on it.
  const events: string[] = []
  const stream = {
    write: (line: string) => {
      const event = (JSON.parse(line) as { consulNative?: { event?: string } }).consulNative?.event
      if (event === undefined) return
      events.push(event)
      if (event === 'deregister-after-registration') release()
    }
  }
  proxy.on('client-gone', release)
  const app = Fastify({ https: httpsOptions(), logger: { level: 'debug', stream } })
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: proxy.address }, register: { check: 'tcp' } })

  const listening = app.listen({ port: 0, host: '127.0.0.1' }).then(() => null, (e: unknown) => e)
  await registered
  t.equal(Object.keys((await call(agent, 'GET', '/v1/agent/services')).body).length, 1, 'the agent has registered it')
  await app.close()
  await listening
  t.same((await call(agent, 'GET', '/v1/agent/services')).body, {}, 'no instance is left registered')
  t.ok(events.includes('deregistered'), 'it was deregistered')
})
