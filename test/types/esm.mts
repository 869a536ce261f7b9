// What an ES module consumer writes (compiled under node16, nodenext and bundler resolution by
// scripts/check-consumer-types.js, against the built package): the default import is the plugin,
// named exports and types resolve, and the Fastify augmentation applies.
import Fastify from 'fastify'
import consulNative, { consulNative as named, httpsOptions, DeniedError, OutboundTimeoutError } from 'fastify-consul-native'
import type { ConsulNativeOptions, OutboundFetchInit, ServiceIdentity } from 'fastify-consul-native'
import devAgent, { startDevAgent } from 'fastify-consul-native/dev-agent'
import type { DevAgent } from 'fastify-consul-native/dev-agent'

const app = Fastify({ https: httpsOptions() })
const options: ConsulNativeOptions = { service: 'api', namespace: 'team' }
await app.register(consulNative, options)
await app.register(named, options)
// @ts-expect-error service is required
await app.register(consulNative, {})
app.get('/', { config: { consulNative: false } }, async (request) => {
  const source: ServiceIdentity | null = request.consulSource
  return source?.service
})
const init: OutboundFetchInit = { timeout: 1000, headersTimeout: 500, bodyTimeout: 500, namespace: 'team', partition: 'part' }
const res = await app.consulNative.fetch('billing', '/', init)
const status: number = res.status
const denied: 'FST_CONSUL_NATIVE_DENIED' = new DeniedError().code
const timedOut: 504 = new OutboundTimeoutError('billing', 'late').statusCode
const agent: DevAgent = await startDevAgent({ port: 0 })
const same: typeof startDevAgent = devAgent.startDevAgent
export { status, denied, timedOut, agent, same }
