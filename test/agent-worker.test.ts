// The agent worker thread (option `agent.worker`, docs/semantics.md#agent-worker): its protocol,
// its life (started on demand, reused, ended when idle, replaced when it dies, left aside when it
// cannot start), and the plugin with the option on. test/agent-client-worker.test.ts runs every
// AgentClient test through it as well.
import t from 'tap'
import { join } from 'node:path'
import { MessageChannel } from 'node:worker_threads'
import diagnostics from 'node:diagnostics_channel'
import { once } from 'node:events'
import Fastify from 'fastify'
import type { FastifyInstance } from 'fastify'
import consulNative, { httpsOptions } from '../lib/index'
import { AgentClient } from '../lib/agent/client'
import { resolveAgentConfig } from '../lib/agent/config'
import type { ExchangeRequest, ExchangeTarget } from '../lib/agent/exchange'
import { AgentThread, serveExchanges } from '../lib/agent/worker-transport'
import { AgentUnreachableError } from '../lib/errors'
import { FakeAgent } from './helpers/agent-fixtures'
import { get, leafFor, mtlsClient, setIntentions, startAgent } from './helpers/mesh'

const FAILING = join(__dirname, 'helpers', `failing-agent-worker${__filename.endsWith('.ts') ? '.ts' : '.js'}`)

async function fakeAgent (tt: { teardown: (fn: () => unknown) => void }): Promise<FakeAgent> {
  const agent = await FakeAgent.start()
  tt.teardown(() => agent.close())
  agent.handler = (req) => ({ status: 200, headers: { 'content-type': 'application/json', 'x-consul-index': '7' }, body: JSON.stringify({ path: req.path }) })
  return agent
}

const targetOf = (agent: FakeAgent): ExchangeTarget => ({ origin: agent.origin, socketPath: null, tls: null, connections: 2 })
const request = (path: string, extra: Partial<ExchangeRequest> = {}): ExchangeRequest =>
  ({ pool: 'short', method: 'GET', path, headers: {}, body: undefined, timeoutMs: 5_000, maxBodyBytes: 1 << 20, allow404: false, ...extra })
const waitFor = async (check: () => boolean, what: string): Promise<void> => {
  const until = Date.now() + 20_000
  while (!check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

t.test('the worker side answers calls, aborts, closes and exits over its port', async (t) => {
  const agent = await fakeAgent(t)
  const { port1, port2 } = new MessageChannel()
  serveExchanges(port2)
  const replies: any[] = []
  port1.on('message', (m) => replies.push(m))
  const target = targetOf(agent)
  const next = async (): Promise<any> => { await waitFor(() => replies.length > 0, 'a reply'); return replies.shift() }

  port1.postMessage({ type: 'call', id: 1, client: 1, target, req: request('/v1/agent/self') })
  const ok = await next()
  t.match(ok, { id: 1, ok: true, response: { status: 200, text: '{"path":"/v1/agent/self"}', overflow: false } })
  t.equal(ok.response.headers['x-consul-index'], '7', 'headers cross as they are')

  port1.postMessage({ type: 'call', id: 2, client: 1, target, req: request('/v1/agent/self', { maxBodyBytes: 5 }) })
  t.match(await next(), { id: 2, ok: true, response: { overflow: true, text: '{"pat' } }, 'a body over the limit comes back cut, marked overflow')

  agent.handler = () => ({ hang: true })
  port1.postMessage({ type: 'call', id: 3, client: 1, target, req: request('/v1/agent/self') })
  await waitFor(() => agent.requests.length === 3, 'the call to reach the agent')
  port1.postMessage({ type: 'abort', id: 3 })
  port1.postMessage({ type: 'abort', id: 99 })
  t.match(await next(), { id: 3, ok: false, error: { name: 'AbortError' } }, 'an aborted call fails with the abort (an unknown id is ignored)')

  port1.postMessage({ type: 'call', id: 4, client: 1, target, req: request('/v1/agent/self') })
  await waitFor(() => agent.requests.length === 4, 'the call to reach the agent')
  port1.postMessage({ type: 'close', id: 5, client: 1 })
  const [failed, closed] = [await next(), await next()]
  t.match(failed, { id: 4, ok: false, error: { message: String } }, 'closing a client fails its call in flight')
  t.same(closed, { id: 5, ok: true, response: null })
  port1.postMessage({ type: 'close', id: 6, client: 42 })
  t.same(await next(), { id: 6, ok: true, response: null }, 'closing a client without pools is fine')

  const portClosed = new Promise((resolve) => port1.once('close', resolve))
  port1.postMessage({ type: 'exit' })
  await portClosed
  t.pass('exit closes the port (the thread then ends on its own)')
})

t.test('one worker serves every client, keeps the process open only while a call waits, and ends when idle', async (t) => {
  const agent = await fakeAgent(t)
  const idleExitMs = 400
  const thread = new AgentThread(undefined, idleExitMs)
  t.equal(thread.usable, true)
  t.equal(thread.threadId, null, 'no worker before the first call')
  const a = thread.exchanger(targetOf(agent))
  const b = thread.exchanger(targetOf(agent))
  t.equal((await a.exchange(request('/a'), undefined)).text, '{"path":"/a"}')
  const first = thread.threadId
  t.type(first, 'number')
  t.equal((await b.exchange(request('/b'), undefined)).text, '{"path":"/b"}')
  t.equal(thread.threadId, first, 'both clients share the worker')

  await a.destroy()
  t.equal(thread.threadId, first, 'one client left: the worker stays')
  const requests = agent.requests.length
  await t.rejects(a.exchange(request('/late'), undefined), { code: 'UND_ERR_DESTROYED' }, 'a destroyed client sends nothing more')
  t.equal(agent.requests.length, requests)
  await b.destroy()
  await b.destroy()
  t.equal(thread.threadId, first, 'no client left: the worker stays for a while')
  const c = thread.exchanger(targetOf(agent))
  await new Promise((resolve) => setTimeout(resolve, idleExitMs + 200))
  t.equal((await c.exchange(request('/c'), undefined)).text, '{"path":"/c"}')
  t.equal(thread.threadId, first, 'a client opened within the idle time reuses it')
  await c.destroy()
  const started = Date.now()
  await waitFor(() => thread.threadId === null, 'the idle exit')
  t.ok(Date.now() - started >= idleExitMs - 100, 'it ended once idle for idleExitMs')

  const d = thread.exchanger(targetOf(agent))
  t.teardown(() => d.destroy())
  t.equal((await d.exchange(request('/d'), undefined)).text, '{"path":"/d"}', 'a later client starts a new worker')
  t.not(thread.threadId, first)
})

t.test('aborts: before the call, and while it waits', async (t) => {
  const agent = await fakeAgent(t)
  const thread = new AgentThread()
  const client = thread.exchanger(targetOf(agent))
  t.teardown(() => client.destroy())
  const early = new AbortController()
  early.abort(new Error('not now'))
  await t.rejects(client.exchange(request('/x'), early.signal), { message: 'not now' }, 'an aborted signal rejects at once')
  t.equal(agent.requests.length, 0)

  agent.handler = () => ({ hang: true })
  const late = new AbortController()
  const pending = client.exchange(request('/x'), late.signal)
  await waitFor(() => agent.requests.length === 1, 'the call to reach the agent')
  late.abort(new Error('changed my mind'))
  await t.rejects(pending, { message: 'changed my mind' }, 'an abort rejects with its reason')
  agent.handler = () => ({ status: 200, body: 'fine' })
  t.equal((await client.exchange(request('/y'), undefined)).text, 'fine', 'the client works on')
})

t.test('a worker that cannot start leaves its clients to their own pools', async (t) => {
  const agent = await fakeAgent(t)
  const missing = new AgentThread(join(__dirname, 'no-such-agent-worker.js'))
  t.equal(missing.usable, false, 'a missing entry file (a bundle that left it out)')
  const bundled = missing.exchanger(targetOf(agent))
  t.equal(bundled.thread, 'main')
  t.equal((await bundled.exchange(request('/own'), undefined)).text, '{"path":"/own"}', 'served by the client\'s own pools')
  await bundled.destroy()

  process.env.AGENT_WORKER_FAILURE = 'load'
  t.teardown(() => { delete process.env.AGENT_WORKER_FAILURE })
  const broken = new AgentThread(FAILING)
  const client = broken.exchanger(targetOf(agent))
  t.teardown(() => client.destroy())
  const err = await client.exchange(request('/first'), undefined).then(() => null, (e: Error) => e)
  t.match(err?.message, /^the agent worker thread exited \(code 1\): boom at load$/, 'the call that found it broken fails, saying why')
  t.equal(broken.usable, false)
  t.equal(client.thread, 'main', 'and says so')
  t.equal((await client.exchange(request('/second'), undefined)).text, '{"path":"/second"}', 'later calls go through the client\'s own pools')
})

t.test('a worker that dies fails the calls it held; the next call starts another', async (t) => {
  const agent = await fakeAgent(t)
  const thread = new AgentThread(FAILING)
  const client = thread.exchanger(targetOf(agent))
  t.teardown(() => client.destroy())
  t.equal((await client.exchange(request('/before'), undefined)).text, '{"path":"/before"}')
  const first = thread.threadId
  agent.handler = () => ({ hang: true })
  const held = client.exchange(request('/held'), undefined)
  await waitFor(() => agent.requests.length === 2, 'the held call')
  await t.rejects(client.exchange(request('/crash'), undefined), { message: 'the agent worker thread exited (code 3)' })
  await t.rejects(held, { message: 'the agent worker thread exited (code 3)' }, 'every call it held fails')
  agent.handler = () => ({ status: 200, body: 'again' })
  t.equal((await client.exchange(request('/after'), undefined)).text, 'again')
  t.equal(thread.usable, true, 'a worker that had answered is not a broken setup')
  t.not(thread.threadId, first, 'a new worker')
})

t.test('AgentClient through the worker: a refused connection is an unreachable agent, its cause intact', async (t) => {
  const agent = await FakeAgent.start()
  const origin = agent.origin
  await agent.close()
  const client = new AgentClient(resolveAgentConfig({ address: origin }, {}), { worker: true })
  t.teardown(() => client.close())
  t.equal(client.thread, 'worker')
  const err = await client.roots().then(() => null, (e: Error) => e)
  t.ok(err instanceof AgentUnreachableError)
  t.match(err?.message, `Consul agent unreachable at ${origin}: connect ECONNREFUSED`)
  t.equal((err?.cause as NodeJS.ErrnoException).code, 'ECONNREFUSED', 'the code crosses the thread boundary')
})

t.test('the plugin with agent.worker: no agent request leaves the main thread', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setIntentions(agent, 'api', [{ Name: 'web', Action: 'allow' }])
  const created: string[] = []
  const onCreate = (message: unknown): void => { const r = (message as { request: { origin: string, path: string } }).request; created.push(`${r.origin}${r.path}`) }
  diagnostics.subscribe('undici:request:create', onCreate)
  const started = async (worker: boolean): Promise<{ app: FastifyInstance, origin: string, count: number }> => {
    created.length = 0
    const app = Fastify({ https: httpsOptions() })
    t.teardown(async () => await app.close())
    await app.register(consulNative, { service: 'api', agent: { address: agent.address, worker } })
    app.get('/hello', async () => ({ hello: 'world' }))
    await app.listen({ port: 0, host: '127.0.0.1' })
    const count = created.filter((url) => url.startsWith(agent.address)).length
    return { app, origin: `https://127.0.0.1:${(app.server.address() as { port: number }).port}`, count }
  }
  const onMain = await started(false)
  const onWorker = await started(true)
  diagnostics.unsubscribe('undici:request:create', onCreate)
  t.ok(onMain.count >= 3, `without the option, the plugin's agent calls start on the main thread (${onMain.count})`)
  t.equal(onWorker.count, 0, 'with it, none does')

  const web = mtlsClient(t, await leafFor(agent, 'web'))
  const other = mtlsClient(t, await leafFor(agent, 'other'))
  t.equal((await get(web, `${onWorker.origin}/hello`)).status, 200, 'an allowed caller is served')
  t.equal((await get(other, `${onWorker.origin}/hello`)).status, 403, 'another is denied')
  const changed = once(onWorker.app.consulNative.events, 'intentions')
  await setIntentions(agent, 'api', [{ Name: 'other', Action: 'allow' }])
  await changed
  t.equal((await get(other, `${onWorker.origin}/hello`)).status, 200, 'intention changes arrive through the worker')
})

t.test('agent.worker must be a boolean', async (t) => {
  const app = Fastify({ https: httpsOptions() })
  await t.rejects((async () => { await app.register(consulNative, { service: 'api', agent: { worker: 'yes' } } as never) })(),
    { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /agent\.worker: must be true or false, got "yes"/ })
  await app.close()
})
