// What a CommonJS consumer writes (compiled under node16 resolution by
// scripts/check-consumer-types.js, against the built package).
import consulNative = require('fastify-consul-native')
import devAgent = require('fastify-consul-native/dev-agent')
import Fastify = require('fastify')

const app = Fastify({ https: consulNative.httpsOptions() })
const options: consulNative.ConsulNativeOptions = { service: 'api' }
void app.register(consulNative.default, options)
void app.register(consulNative.consulNative, options)
// @ts-expect-error service is required
void app.register(consulNative.default, {})
app.get('/', async (request) => request.consulSource?.service)
const init: consulNative.OutboundFetchInit = { timeout: 1000 }
const code: 'FST_CONSUL_NATIVE_TIMEOUT' = new consulNative.OutboundTimeoutError('billing', 'late').code
const agent: Promise<devAgent.DevAgent> = devAgent.startDevAgent()
export { init, code, agent }
