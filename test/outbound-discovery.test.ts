// Outbound discovery against what a real agent lists, and the server check on every connection
// (docs/semantics.md#discovery): instances that cannot be dialled over TCP are left out, not the
// whole answer; terminating gateways get the SNI naming the service; no TLS session is resumed.
import t from 'tap'
import { EventEmitter } from 'node:events'
import https from 'node:https'
import type { AddressInfo } from 'node:net'
import type { TLSSocket } from 'node:tls'
import type { FastifyBaseLogger } from 'fastify'
import { AgentClient } from '../lib/agent/client'
import { resolveAgentConfig } from '../lib/agent/config'
import type { DevAgent } from '../lib/dev-agent/index'
import { ServiceCaller, parseHealthConnect, serviceSni } from '../lib/outbound'
import { DynamicTls } from '../lib/tls'
import { FakeAgent, RecordingLogger } from './helpers/agent-fixtures'
import { agentCall, leafMaterial, startAgent } from './helpers/mesh'
import type { Tap } from './helpers/mesh'

/** A ServiceCaller as `web`, discovering through `address` (the dev agent, or a fake one). */
async function callerAs (t: Tap, agent: DevAgent, address = agent.address): Promise<ServiceCaller> {
  const client = new AgentClient(resolveAgentConfig({ address }, {}))
  const tls = new DynamicTls()
  tls.update(await leafMaterial(agent, 'web'))
  const caller = new ServiceCaller({ client, tls, tlsEvents: new EventEmitter(), log: new RecordingLogger() as unknown as FastifyBaseLogger, blockingWait: 1_000 })
  t.teardown(async () => { await caller.close(); await client.close() })
  return caller
}

/** An HTTPS server answering `{ who }`, recording the SNI of each connection. */
async function server (t: Tap, opts: https.ServerOptions & { who: string }, port = 0): Promise<{ port: number, sni: Array<string | false | null>, close: () => Promise<void> }> {
  const sni: Array<string | false | null> = []
  const s = https.createServer(opts, (_req, res) => res.end(JSON.stringify({ who: opts.who })))
  s.on('secureConnection', (socket: TLSSocket) => sni.push(socket.servername))
  await new Promise<void>((resolve) => s.listen(port, '127.0.0.1', resolve))
  const close = async (): Promise<void> => { s.closeAllConnections(); await new Promise((resolve) => s.close(resolve)) }
  t.teardown(close)
  return { port: (s.address() as AddressInfo).port, sni, close }
}

async function register (agent: DevAgent, body: object): Promise<void> {
  const res = await agentCall(agent, 'PUT', '/v1/agent/service/register', body)
  if (res.status !== 200) throw new Error(`register: ${res.status} ${JSON.stringify(res.body)}`)
}

t.test('parseHealthConnect: an entry that cannot be dialled over TCP is left out, the others stay', async (t) => {
  const entry = (service: object, node: object = { Address: '10.0.0.1', Datacenter: 'dc1' }): object => ({ Node: node, Service: { ID: 'i', ...service } })
  t.same(parseHealthConnect([entry({ Address: '10.0.0.2', Port: 8443 })], 'p'), [{ origin: 'https://10.0.0.2:8443', id: 'i', gatewayDatacenter: null }])
  const mixed = [null, entry({ Port: 1 }, {}), entry({ Address: 5, Port: 1 }), entry({ Port: '1' }), entry({ Port: 0, SocketPath: '/run/api.sock' }), entry({ Port: 65536 }), entry({ Port: 7 })]
  t.same(parseHealthConnect(mixed, 'p').map((i) => i.origin), ['https://10.0.0.1:7'])
  t.same(parseHealthConnect([entry({ Kind: 'terminating-gateway', Port: 8443 })], 'p'), [{ origin: 'https://10.0.0.1:8443', id: 'i', gatewayDatacenter: 'dc1' }], 'a terminating gateway, with its datacenter')
  t.same(parseHealthConnect([entry({ Kind: 'terminating-gateway', Port: 8443 }, { Address: '10.0.0.1' })], 'p'), [], 'one without a datacenter cannot be named: left out')
  t.equal(serviceSni({ service: 'api', namespace: 'default', trustDomain: 'td.consul' }, 'dc2'), 'api.default.dc2.internal.td.consul')
  t.equal(serviceSni({ service: 'api', namespace: 'ns1', partition: 'ap1', trustDomain: 'td.consul' }, 'dc2'), 'api.ns1.ap1.dc2.internal-v1.td.consul', 'Consul\'s SNI with a partition')
})

t.test('an instance registered with a SocketPath does not hide the others', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const api = await leafMaterial(agent, 'api')
  const one = await server(t, { key: api.keyPem, cert: api.certPem, who: 'api' })
  await register(agent, { ID: 'api-sock', Name: 'api', SocketPath: '/run/api.sock', Connect: { Native: true } })
  await register(agent, { ID: 'api-1', Name: 'api', Address: '127.0.0.1', Port: one.port, Connect: { Native: true } })
  const caller = await callerAs(t, agent)
  t.same(await (await caller.fetch('api', '/')).json(), { who: 'api' })
})

t.test('a terminating gateway is dialled with the SNI that names the service; its certificate is checked as the service\'s', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const api = await leafMaterial(agent, 'api')
  const gateway = await server(t, { key: api.keyPem, cert: api.certPem, who: 'gateway' })
  const fake = await FakeAgent.start()
  t.teardown(() => fake.close())
  fake.handler = () => ({
    status: 200,
    headers: { 'X-Consul-Index': '5' },
    body: JSON.stringify([{ Node: { Address: '127.0.0.1', Datacenter: 'dc3' }, Service: { ID: 'tgw-1', Kind: 'terminating-gateway', Service: 'tgw', Address: '', Port: gateway.port } }])
  })
  const caller = await callerAs(t, agent, fake.origin)
  t.same(await (await caller.fetch('api', '/')).json(), { who: 'gateway' })
  t.same(gateway.sni, [`api.default.dc3.internal.${agent.trustDomain}`])
})

t.test('no TLS session is resumed: every connection checks the server\'s identity (Node checks it only on a full handshake)', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const api = await leafMaterial(agent, 'api')
  const other = await leafMaterial(agent, 'other')
  // Two servers that share their ticket keys (a shared key file): a ticket from one resumes on the other.
  const ticketKeys = Buffer.alloc(48, 7)
  const first = await server(t, { key: api.keyPem, cert: api.certPem, ticketKeys, keepAliveTimeout: 1, who: 'api' })
  await register(agent, { ID: 'api-1', Name: 'api', Address: '127.0.0.1', Port: first.port, Connect: { Native: true } })
  const caller = await callerAs(t, agent)
  t.same(await (await caller.fetch('api', '/')).json(), { who: 'api' })
  await first.close()
  // Another service's server now answers at that address.
  await server(t, { key: other.keyPem, cert: other.certPem, ticketKeys, who: 'other' }, first.port)
  await new Promise((resolve) => setTimeout(resolve, 50))
  const outcome = await caller.fetch('api', '/').then(async (res) => await res.json(), (err: Error & { code?: string }) => err.code)
  t.equal(outcome, 'FST_CONSUL_NATIVE_PEER_MISMATCH', 'the impostor is refused, resumed ticket or not')
})
