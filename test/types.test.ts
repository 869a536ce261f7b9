// The public types, checked by the type-check step (`npm run typecheck` compiles this file; a
// `@ts-expect-error` that is not an error fails it) and run as a small test.
import t from 'tap'
import Fastify from 'fastify'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import consulNative, { consulNative as named, httpsOptions, DeniedError, UnauthenticatedError, InvalidOptionError, NoInstancesError } from '../lib/index'
import type { ConsulDecision, ConsulNativeOptions, ConsulNativeStatus, Decision, Explanation, ServiceIdentity } from '../lib/index'
import { startDevAgent } from '../lib/dev-agent/index'
import type { DevAgent, DevAgentOptions } from '../lib/dev-agent/index'

t.test('the public types describe what users write', async (t) => {
  t.equal(consulNative, named, 'default and named export are one plugin')
  const options: ConsulNativeOptions = {
    service: 'api',
    agent: { address: '127.0.0.1:8500', token: 'x', insecureSkipVerify: false },
    defaultPolicy: 'deny',
    health: { url: '/-/health' },
    mode: 'l7',
    readyTimeout: 5000
  }
  // @ts-expect-error service is required
  const missing: ConsulNativeOptions = { agent: {} }
  // @ts-expect-error defaultPolicy is 'agent' | 'allow' | 'deny'
  const wrong: ConsulNativeOptions = { service: 'api', defaultPolicy: 'maybe' }
  const limited: ConsulNativeOptions = { service: 'api', logDenials: { sample: 10, perSecond: 5 } }
  // @ts-expect-error logDenials takes numbers
  const badLimit: ConsulNativeOptions = { service: 'api', logDenials: { perSecond: 'many' } }
  t.ok(limited && badLimit)
  t.ok(options && missing && wrong)
  // Certificate sources: each source takes only its own settings.
  const agentless: ConsulNativeOptions = { service: 'api', certificates: { source: 'consul-grpc', address: 'consul-server:8503', caFile: '/ca.pem', tlsServerName: 'server.dc1.consul' } }
  const files: ConsulNativeOptions = { service: 'api', certificates: { source: 'files', dir: '/run/secrets/workload-spiffe-credentials', pollInterval: 500 } }
  // @ts-expect-error `dir` belongs to the files source
  const mixed: ConsulNativeOptions = { service: 'api', certificates: { source: 'consul-grpc', dir: '/x' } }
  t.ok(agentless && files && mixed)
  const withGrpc: DevAgentOptions = { grpcPort: 0, grpcTls: true }
  t.ok(withGrpc)

  const app = Fastify({ https: httpsOptions({ minVersion: 'TLSv1.3' }) })
  // @ts-expect-error the certificate belongs to the plugin (and is refused at run time too)
  t.throws(() => httpsOptions({ cert: 'x' }), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION' })
  app.get('/open', { config: { consulNative: false } }, async () => 'ok')
  app.get('/ops', { config: { consulNative: { sources: [{ name: 'ops', action: 'allow' }] } } }, async () => 'ok')
  // The README's example: JavaScript spelling of L7 permissions.
  app.post('/admin/reindex', {
    config: {
      consulNative: {
        sources: [
          { name: 'ops', action: 'allow' },
          { name: 'web', permissions: [{ action: 'allow', http: { methods: ['POST'], header: [{ name: 'x-reason', present: true }] } }] },
          { name: '*', action: 'deny' }
        ]
      }
    }
  }, async () => 'ok')
  // Rollout: per-route enforcement, alone or with sources; plugin options.
  app.get('/new', { config: { consulNative: { enforcement: 'shadow' } } }, async () => 'ok')
  app.get('/both', { config: { consulNative: { enforcement: 'enforce', sources: [{ name: 'ops', action: 'allow' }] } } }, async () => 'ok')
  // @ts-expect-error enforcement is 'enforce' | 'shadow'
  app.get('/dry', { config: { consulNative: { enforcement: 'dry-run' } } }, async () => 'ok')
  const rollout: ConsulNativeOptions = { service: 'api', enforcement: 'shadow', candidate: './intentions.next.json' }
  // @ts-expect-error enforcement is 'enforce' | 'shadow'
  const wrongMode: ConsulNativeOptions = { service: 'api', enforcement: 'off' }
  t.ok(rollout && wrongMode)
  // @ts-expect-error true is not a route setting (and is refused at run time only once registered)
  app.get('/bad', { config: { consulNative: true } }, async () => 'ok')
  app.get('/who', async (request: FastifyRequest) => {
    const source: ServiceIdentity | null = request.consulSource
    const decision: Decision | null = request.consulDecision
    const shadowed: false | undefined = (request.consulDecision as ConsulDecision | null)?.enforced
    return { service: source?.service, allow: decision?.allow, shadowed }
  })
  const typed = app as unknown as FastifyInstance
  const status = (): ConsulNativeStatus => typed.consulNative.status()
  t.type(status, 'function')
  const explain = (): Explanation => typed.consulNative.explain({ source: 'web', method: 'GET', path: '/', headers: { 'x-env': 'prod' }, route: '/open' })
  t.type(explain, 'function')
  t.type(typed.consulNative?.events?.on ?? (() => {}), 'function')
  t.equal(new DeniedError().statusCode, 403)
  t.equal(new UnauthenticatedError().statusCode, 401)
  // Answers to refused requests carry no stack trace (it would point at the plugin's hook); faults do.
  t.equal(new DeniedError().stack, undefined)
  t.equal(new UnauthenticatedError().stack, undefined)
  t.type(new DeniedError(), Error)
  t.match(new InvalidOptionError('service', 'must be a name').stack, /InvalidOption|FastifyError/)
  // Each error class takes exactly the arguments its message formats, typed (plus an optional `{ cause }`).
  const invalid = new InvalidOptionError('service', 'must be a name', { cause: new Error('x') })
  const code: 'FST_CONSUL_NATIVE_INVALID_OPTION' = invalid.code
  t.equal(code, 'FST_CONSUL_NATIVE_INVALID_OPTION')
  t.equal(invalid.message, 'Invalid fastify-consul-native option service: must be a name')
  t.type(invalid.cause, Error)
  // @ts-expect-error the option name is a string
  t.ok(new InvalidOptionError(1, 'x'))
  // @ts-expect-error DeniedError formats nothing
  t.ok(new DeniedError('why'))
  // @ts-expect-error NoInstancesError names one service
  t.ok(new NoInstancesError('a', 'b'))
  const status503: 503 = new NoInstancesError('api').statusCode
  t.equal(status503, 503)

  const devOptions: DevAgentOptions = { port: 0, defaultPolicy: 'allow', leafTTL: '72h' }
  const agent: DevAgent = await startDevAgent(devOptions)
  t.match(agent.address, /^http:\/\/127\.0\.0\.1:\d+$/)
  t.match(agent.trustDomain, /\.consul$/)
  await agent.close()
  await app.close()
})
