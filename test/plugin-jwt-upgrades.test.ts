// JWT requirements on long-lived connections (docs/semantics.md#transport-long-lived, docs/semantics.md#jwt-cache):
// with recheckUpgrades, an open WebSocket is decided again, its token verified again, when the
// providers change; a token the changed provider refuses closes it.
import { once } from 'node:events'
import t from 'tap'
import Fastify from 'fastify'
import type { FastifyInstance } from 'fastify'
import websocket from '@fastify/websocket'
import WebSocket from 'ws'
import consulNative, { httpsOptions } from '../lib/index'
import { agentCall, leafFor, setIntentions, setProtocol, startAgent } from './helpers/mesh'
import { localProvider, newIssuer } from './helpers/jwt'

const noServerIdentityCheck = (() => undefined) as unknown as () => boolean

t.test('recheckUpgrades: a changed provider verifies an open WebSocket\'s token again', async (t) => {
  const okta = await newIssuer('ES256')
  const agent = await startAgent(t, { defaultPolicy: 'deny' })
  await setProtocol(agent, 'api', 'http')
  t.equal((await agentCall(agent, 'PUT', '/v1/config', localProvider('okta', [okta]))).status, 200)
  await setIntentions(agent, 'api', [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' }, JWT: { Providers: [{ Name: 'okta' }] } }] }])
  const app: FastifyInstance = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, recheckUpgrades: true })
  await app.register(websocket)
  app.get('/ws', { websocket: true }, (socket: WebSocket) => { socket.on('message', (m: Buffer) => socket.send(`echo ${m.toString()}`)) })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port

  const ws = new WebSocket(`wss://127.0.0.1:${port}/ws`, {
    ...(await leafFor(agent, 'web')),
    checkServerIdentity: noServerIdentityCheck,
    headers: { authorization: `Bearer ${await okta.sign()}` }
  })
  t.teardown(() => ws.terminate())
  await once(ws, 'open')
  ws.send('hi')
  t.equal(String((await once(ws, 'message'))[0]), 'echo hi')

  const closed = once(ws, 'close')
  t.equal((await agentCall(agent, 'PUT', '/v1/config', localProvider('okta', [okta], { Audiences: ['nobody'] }))).status, 200)
  await closed
  t.pass('the token no longer satisfies the changed provider: the WebSocket is closed')
})
