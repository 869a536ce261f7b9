// The agent client keeps short calls apart from long polls (docs/semantics.md#outbound-agent-pools):
// with 40 outbound targets watched, every discovery poll parked at the agent, authorize, TTL
// passes, registration, deregistration and a catalog read still complete, and no poll has returned.
import t from 'tap'
import { EventEmitter } from 'node:events'
import type { FastifyBaseLogger } from 'fastify'
import { ServiceCaller } from '../lib/outbound'
import { DynamicTls } from '../lib/tls'
import { startProxy } from './helpers/agent-proxy'
import type { ProxiedCall } from './helpers/agent-proxy'
import { RecordingLogger } from './helpers/agent-fixtures'
import { call, clientFor, startAgent } from './helpers/registration'
import type { SpiedAnswer } from './helpers/registration'

const TARGETS = 40
const isPoll = (c: ProxiedCall): boolean => c.url.startsWith('/v1/health/connect/') && /[?&]index=/.test(c.url)

t.test(`short calls complete while ${TARGETS} outbound discovery polls are parked at the agent`, async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const proxy = await startProxy(t, agent.address)
  const client = clientFor(t, proxy.address)
  const log = new RecordingLogger()
  // Polls wait 10 minutes: none returns during the test unless the agent's catalog changes.
  const caller = new ServiceCaller({ client, tls: new DynamicTls(), tlsEvents: new EventEmitter(), log: log as unknown as FastifyBaseLogger, blockingWait: 600_000 })
  t.teardown(async () => await caller.close())
  const pollAnswers: SpiedAnswer[] = []
  client.events.on('answer', (a: SpiedAnswer) => { if ((a.opts.blocking?.index ?? 0) > 0) pollAnswers.push(a) })
  // For every other call: how many polls the agent was holding when it arrived there.
  const parkedAtArrival: Array<[string, number]> = []
  proxy.on('call', (c: ProxiedCall) => { if (!isPoll(c)) parkedAtArrival.push([`${c.method} ${c.url.split('?')[0] as string}`, proxy.parked(isPoll).length]) })
  const allParked = async (): Promise<void> => await proxy.until(() => proxy.parked(isPoll).length === TARGETS)

  // A TTL check that is already passing: passing it again changes nothing, so it wakes no poll.
  const check = { CheckID: 'web-1-health', TTL: '30s', Status: 'passing' }
  t.equal((await client.request('PUT', '/v1/agent/service/register', { body: { ID: 'web-1', Name: 'web', Port: 8443, Connect: { Native: true }, Check: check } })).status, 200)

  // Each target's first discovery answer is an empty list; its watch then blocks on the next index.
  for (let i = 0; i < TARGETS; i++) {
    await t.rejects(caller.fetch(`target-${i}`, '/'), { code: 'FST_CONSUL_NATIVE_NO_INSTANCES' })
  }
  await allParked()
  parkedAtArrival.length = 0

  // Calls that change nothing: every one completes while all polls stay parked.
  t.equal((await client.request('PUT', '/v1/agent/check/pass/web-1-health')).status, 200, 'TTL pass')
  t.equal((await client.authorize('web', `spiffe://${agent.trustDomain}/ns/default/dc/dc1/svc/api`)).Authorized, true, 'authorize')
  t.equal((await client.request<unknown[]>('GET', '/v1/health/connect/web')).body.length, 1, 'a non-blocking catalog read')
  t.equal(proxy.parked(isPoll).length, TARGETS, 'every discovery poll is still parked at the agent')
  t.same(pollAnswers, [], 'and none returned: the short calls did not wait for one')

  // Registration and deregistration change the catalog (and wake the polls), but reach the agent
  // while every poll is parked.
  t.equal((await client.request('PUT', '/v1/agent/service/register', { body: { ID: 'web-2', Name: 'web', Port: 8444, Connect: { Native: true } } })).status, 200, 'registration')
  await allParked()
  t.equal((await client.request('PUT', '/v1/agent/service/deregister/web-2')).status, 200, 'deregistration')
  t.same(parkedAtArrival, [
    ['PUT /v1/agent/check/pass/web-1-health', TARGETS],
    ['POST /v1/agent/connect/authorize', TARGETS],
    ['GET /v1/health/connect/web', TARGETS],
    ['PUT /v1/agent/service/register', TARGETS],
    ['PUT /v1/agent/service/deregister/web-2', TARGETS]
  ], 'each short call reached the agent while it held every poll')
  t.same(Object.keys((await call(agent, 'GET', '/v1/agent/services')).body), ['web-1'])
})
