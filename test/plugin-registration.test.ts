// Registration with the local agent: a Connect-native service whose check really passes, that
// comes back when the agent loses it, and that leaves cleanly under load.
import t from 'tap'
import { spawn } from 'node:child_process'
import http from 'node:http'
import net from 'node:net'
import path from 'node:path'
import Fastify from 'fastify'
import consulNative, { httpsOptions } from '../lib/index'
import type { DevAgent } from '../lib/dev-agent/index'
import { agentCall, get, leafFor, mtlsClient, startAgent, startService } from './helpers/mesh'

/** Blocks on the agent until `predicate` holds for GET `path` (a blocking endpoint). */
async function waitOnAgent (agent: DevAgent, urlPath: string, predicate: (body: any, status: number) => boolean): Promise<any> {
  let index = 0
  for (;;) {
    const separator = urlPath.includes('?') ? '&' : '?'
    const res = await agentCall(agent, 'GET', `${urlPath}${index > 0 ? `${separator}index=${index}&wait=5s` : ''}`)
    if (predicate(res.body, res.status)) return res.body
    index = Number(res.headers['x-consul-index'] ?? 0)
  }
}

const passing = (body: unknown): boolean => Array.isArray(body) && body.length === 1

t.test('register: a Connect-native instance whose HTTPS health check passes without a client certificate', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent, { plugin: { register: { checkInterval: '1s', tags: ['v1'], meta: { version: '1' } } } })
  const id = `api-${(await import('node:os')).hostname()}-${svc.port}`
  const instance = await agentCall(agent, 'GET', `/v1/agent/service/${id}`)
  t.equal(instance.status, 200)
  t.match(instance.body, { ID: id, Service: 'api', Port: svc.port, Address: '127.0.0.1', Tags: ['v1'], Meta: { version: '1' }, Connect: { Native: true } })
  const healthy = await waitOnAgent(agent, '/v1/health/connect/api?passing', passing)
  t.match(healthy[0].Checks.find((check: { ServiceID: string }) => check.ServiceID === id), { Status: 'passing', Type: 'http' })
  t.equal(svc.app.consulNative.status().registration?.registered, true)
})

t.test('a registration the agent lost comes back within a check interval', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent, { plugin: { health: false, register: { check: 'tcp', checkInterval: '1s' } } })
  const id = svc.app.consulNative.status().registration?.id as string
  t.equal((await agentCall(agent, 'PUT', `/v1/agent/service/deregister/${id}`)).status, 200)
  await waitOnAgent(agent, '/v1/agent/services', (body) => body[id] !== undefined)
  t.equal(svc.app.consulNative.status().registration?.restored, 1)
})

t.test('a registration that fails makes listen() fail with FST_CONSUL_NATIVE_REGISTER_FAILED, and closes the app', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, register: true })
  await agent.close()
  await t.rejects(app.listen({ port: 0, host: '127.0.0.1' }), { code: 'FST_CONSUL_NATIVE_REGISTER_FAILED', message: /api/ })
  t.equal(app.server.listening, false, 'the server is closed again')
})

t.test('listen() with a callback registers too', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, register: { check: 'ttl' } })
  const address = await new Promise<string>((resolve, reject) => {
    app.listen({ port: 0, host: '127.0.0.1' }, (err, addr) => { if (err !== null) reject(err); else resolve(addr) })
  })
  t.match(address, /^https:\/\/127\.0\.0\.1:\d+$/)
  t.equal(app.consulNative.status().registration?.registered, true)
  const failing = Fastify({ https: httpsOptions() })
  await failing.register(consulNative, { service: 'api', agent: { address: agent.address }, register: true })
  await agent.close()
  const err = await new Promise<Error | null>((resolve) => { failing.listen({ port: 0, host: '127.0.0.1' }, (e) => resolve(e)) })
  t.match(err, { code: 'FST_CONSUL_NATIVE_REGISTER_FAILED' })
})

t.test('close() under load: deregistered first; every request in progress at close() completes', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const inProgress = new Set<string>()
  const svc = await startService(t, agent, {
    plugin: { register: { checkInterval: '1s' } },
    routes (app) {
      app.get('/work', async (request) => {
        inProgress.add(request.id)
        // Work that takes a moment, so that close() finds requests in progress.
        await new Promise((resolve) => setTimeout(resolve, 20))
        inProgress.delete(request.id)
        return { id: request.id }
      })
    }
  })
  await waitOnAgent(agent, '/v1/health/connect/api?passing', passing)
  const client = mtlsClient(t, await leafFor(agent, 'web'))
  const completed = new Set<string>()
  const state = { closing: false }
  const loop = async (): Promise<void> => {
    while (!state.closing) {
      const res = await get(client, `${svc.origin}/work`).catch(() => null)
      if (res?.status === 200) completed.add(res.body.id)
    }
  }
  const loops = [loop(), loop(), loop(), loop()]
  while (completed.size < 20 || inProgress.size === 0) await new Promise((resolve) => setImmediate(resolve))
  const atClose = [...inProgress]
  const closed = svc.app.close()
  state.closing = true
  await closed
  await Promise.all(loops)
  t.ok(atClose.length > 0, `${atClose.length} requests were in progress at close()`)
  t.same(atClose.filter((id) => !completed.has(id)), [], 'each of them completed with 200')
  const health = await agentCall(agent, 'GET', '/v1/health/connect/api')
  t.same(health.body, [], 'the instance is gone from the catalog')
})

t.test('after close() nothing keeps the process alive', async (t) => {
  const execArgv = process.execArgv.filter((arg) => !arg.includes('processinfo'))
  const script = `
    const { startDevAgent } = require('./lib/dev-agent/index.ts')
    const { consulNative, httpsOptions } = require('./lib/index.ts')
    const Fastify = require('fastify')
    ;(async () => {
      const agent = await startDevAgent({ defaultPolicy: 'allow' })
      const app = Fastify({ https: httpsOptions() })
      await app.register(consulNative, { service: 'api', agent: { address: agent.address }, register: { checkInterval: '1s' } })
      await app.listen({ port: 0, host: '127.0.0.1' })
      await app.close()
      await agent.close()
      process.stdout.write('closed\\n')
    })()
  `
  const child = spawn(process.execPath, [...execArgv, '-e', script], { cwd: path.join(__dirname, '..'), stdio: ['ignore', 'pipe', 'inherit'] })
  let out = ''
  child.stdout.on('data', (chunk: Buffer) => { out += chunk.toString() })
  const code = await new Promise<number | null>((resolve) => child.on('exit', resolve))
  t.equal(out, 'closed\n')
  t.equal(code, 0, 'the process exited by itself')
})

t.test('without register, nothing is registered', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent)
  t.same((await agentCall(agent, 'GET', '/v1/agent/services')).body, {})
  t.equal(svc.app.consulNative.status().registration, null)
})

t.test('register() not awaited before listen(): the instance is registered all the same, and a refusal fails listen()', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  app.register(consulNative, { service: 'api', agent: { address: agent.address }, register: { check: 'tcp' } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.equal(app.consulNative.status().registration?.registered, true, 'registered before listen() resolved')
  t.equal((await agentCall(agent, 'GET', '/v1/health/connect/api')).body.length, 1)

  // An agent that refuses registrations: a proxy in front of the dev agent answers 400 to them.
  const refusing = http.createServer((req, res) => {
    if (req.method === 'PUT' && req.url?.startsWith('/v1/agent/service/register') === true) {
      res.statusCode = 400
      res.end('Invalid check: registrations are refused here')
      return
    }
    const upstream = http.request(`${agent.address}${req.url as string}`, { method: req.method, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode as number, answer.headers)
      answer.pipe(res)
    })
    req.pipe(upstream)
  })
  await new Promise<void>((resolve) => refusing.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => { refusing.closeAllConnections(); await new Promise((resolve) => refusing.close(resolve)) })
  const refusingAddress = `http://127.0.0.1:${(refusing.address() as { port: number }).port}`
  const lines: Array<{ consulNative?: { event?: string }, err?: { code?: string } }> = []
  const failing = Fastify({ https: httpsOptions(), logger: { level: 'error', stream: { write: (line: string) => { lines.push(JSON.parse(line)) } } } })
  t.teardown(async () => await failing.close())
  failing.register(consulNative, { service: 'api', agent: { address: refusingAddress }, register: { check: 'tcp' } })
  await t.rejects(failing.listen({ port: 0, host: '127.0.0.1' }), { code: 'FST_CONSUL_NATIVE_REGISTER_FAILED', message: /registrations are refused here/ })
  t.equal(failing.server.listening, false, 'the server is closed again')
  t.match(lines.filter((line) => line.consulNative?.event === 'register-failed'), [{ err: { code: 'FST_CONSUL_NATIVE_REGISTER_FAILED' } }], 'logged once')

  // The callback form, likewise.
  const failingCallback = Fastify({ https: httpsOptions() })
  t.teardown(async () => await failingCallback.close())
  failingCallback.register(consulNative, { service: 'api', agent: { address: refusingAddress }, register: { check: 'tcp' } })
  const err = await new Promise<Error | null>((resolve) => { failingCallback.listen({ port: 0, host: '127.0.0.1' }, (e) => resolve(e)) })
  t.match(err, { code: 'FST_CONSUL_NATIVE_REGISTER_FAILED' })
  t.equal(failingCallback.server.listening, false)
})

t.test('listen() that fails (EADDRINUSE), then again: registered once, and nothing is left after close()', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const busy = net.createServer()
  await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve))
  t.teardown(() => busy.close())
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  app.register(consulNative, { service: 'api', agent: { address: agent.address }, register: { check: 'tcp' } })
  await t.rejects(app.listen({ port: (busy.address() as net.AddressInfo).port, host: '127.0.0.1' }), { code: 'EADDRINUSE' })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const registrations = (): number => agent.requestLog.filter((entry) => entry.method === 'PUT' && entry.path === '/v1/agent/service/register').length
  t.equal(registrations(), 1, 'one registration')
  t.equal(app.consulNative.status().registration?.registered, true)
  await app.close()
  t.same((await agentCall(agent, 'GET', '/v1/agent/services')).body, {}, 'nothing registered after close()')
  t.equal(registrations(), 1)
})
