// fastify-consul-native: wires the pieces into Fastify. Each concern lives in its own module:
//   agent/ (client, watches) → sync (leaf, roots, intentions) → tls (secure context, identity)
//   → intentions/ (pure decision engine) → enforcement (per-request check) → hooks below.
import type { EventEmitter } from 'node:events'
import type { AddressInfo } from 'node:net'
import type { Dispatcher, Response } from 'undici'
import type { FastifyPluginAsync, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { AgentClient } from './agent/client'
import { resolveAgentConfig } from './agent/config'
import { createCertificateSource } from './certificates/index'
import { AgentAuthorizer, consulNativeBackstop, Enforcer } from './enforcement'
import { InvalidOptionError, NotHttpsError, NotRootError } from './errors'
import type { ServiceIdentity } from './identity'
import type { Decision } from './intentions/policy'
import { extendListen, routeConfigReader, routerOptionsOf, serverBindingsOf } from './fastify-internals'
import { metricFamilies, prometheusText } from './metrics'
import type { MetricFamily } from './metrics'
import { resolveOptions } from './options'
import { ServiceCaller } from './outbound'
import type { OutboundFetchInit, OutboundOptions } from './outbound'
import { buildRegistration, ServiceRegistration } from './registration'
import type { ConsulNativeOptions, RouteConsulNativeConfig } from './options'
import { compileRoutePolicy, SERVICE_POLICY, withPrefixTwin } from './route-policy'
import type { RoutePolicy } from './route-policy'
import { ConsulSync } from './sync'
import type { ConsulNativeStatus } from './sync'
import { dynamicTlsOf, httpsOptions } from './tls'

export interface ConsulNativeDecorator {
  /** Leaf, roots, intentions and per-watch sync state; `ready` once everything is loaded. */
  status (): ConsulNativeStatus
  /**
   * `'tls'` after new certificates or roots are installed and `'intentions'` after a policy or
   * normalization update, both with `status()`; `'sync-error'` with `{ watch, error }` when a poll
   * to the agent fails or an update is rejected (the last good state stays in force).
   */
  readonly events: EventEmitter
  /** Request outcomes, sync failures, readiness and leaf expiry, as Prometheus metric families. */
  metrics (): MetricFamily[]
  /** The same in the Prometheus text exposition format, for a plain `/metrics` route. */
  prometheus (): string
  /** Calls another mesh service over verified mTLS (discovery, round robin, one retry for idempotent requests). */
  fetch (service: string, path: string, init?: OutboundFetchInit): Promise<Response>
  /** An undici Dispatcher that sends every request to an instance of `service`, for `request`, `fetch` or `@fastify/reply-from`. */
  dispatcher (service: string, opts?: OutboundOptions): Dispatcher
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** `false` exempts the route (no certificate needed); `{ sources }` adds route-level intentions. */
    consulNative?: RouteConsulNativeConfig | false
  }
  interface FastifyInstance {
    consulNative: ConsulNativeDecorator
  }
  interface FastifyRequest {
    /** The caller's verified Consul service identity, or null. */
    consulSource: ServiceIdentity | null
    /** Why the request was allowed (set before handlers run). */
    consulDecision: Decision | null
  }
}

const kRoutePolicy = Symbol('fastify-consul-native.routePolicy')

const consulNativePlugin: FastifyPluginAsync<ConsulNativeOptions> = async (fastify, rawOptions) => {
  const opts = resolveOptions(rawOptions)
  // Fastify always sets it; 0 turns the timeout off.
  const pluginTimeout = Number(fastify.initialConfig.pluginTimeout)
  if (pluginTimeout > 0 && opts.readyTimeout >= pluginTimeout) {
    throw new InvalidOptionError('readyTimeout', `(${opts.readyTimeout} ms) must be below Fastify's pluginTimeout (${pluginTimeout} ms): lower it or raise pluginTimeout`)
  }
  const tls = dynamicTlsOf(fastify.server)
  if (tls === null) throw new NotHttpsError()
  // Child instances are created with Object.create(parent); only the root's hooks reach every route.
  if (Object.getPrototypeOf(fastify) !== Object.prototype) throw new NotRootError()

  const client = new AgentClient(resolveAgentConfig(opts.agent, process.env), {
    datacenter: opts.datacenter,
    namespace: opts.namespace,
    partition: opts.partition
  })
  const sync = new ConsulSync(opts, client, tls, fastify.log, createCertificateSource(opts, client, process.env, fastify.log))
  const router = routerOptionsOf(fastify)
  if (!router.caseSensitive) {
    fastify.log.warn({ consulNative: { event: 'case-insensitive-router' } },
      'fastify-consul-native: caseSensitive is false: write intention paths in lower case, as every case spelling is checked in lower case')
  }
  const authorizer = opts.mode === 'agent' ? new AgentAuthorizer(client, opts.service) : null
  const enforcer = new Enforcer(tls, sync, router, authorizer)

  fastify.decorateRequest('consulSource', null)
  fastify.decorateRequest('consulDecision', null)
  const metrics = (): MetricFamily[] => metricFamilies(enforcer.counters, sync.failureCounts, sync.status(), Date.now())
  const outbound = new ServiceCaller({ client, tls, tlsEvents: sync.events, log: fastify.log, blockingWait: opts.blockingWait })
  fastify.decorate('consulNative', {
    status: () => sync.status(),
    events: sync.events,
    metrics,
    prometheus: () => prometheusText(metrics()),
    fetch: outbound.fetch.bind(outbound),
    dispatcher: outbound.dispatcher.bind(outbound)
  })
  if (authorizer !== null) sync.events.on('intentions', () => authorizer.invalidate())

  // Routes declared from here on get their policy compiled once, when they are declared (a bad
  // override fails there); the request path only reads it.
  fastify.addHook('onRoute', (route) => {
    const name = `${String(route.method)} ${route.url}`
    const policy = withPrefixTwin(compileRoutePolicy(route.config?.consulNative, name, opts.service), route, router)
    route.config = { ...route.config, [kRoutePolicy]: policy } as typeof route.config
  })

  // One global onRequest hook decides every request, before any body is read: routes declared
  // before the plugin (compiled on first use), and 404s, so that an unauthenticated caller cannot
  // tell which routes exist.
  const routeConfig = routeConfigReader()
  const latePolicies = new WeakMap<object, RoutePolicy>()
  fastify.addHook('onRequest', function consulNativeOnRequest (request, _reply, done) {
    let policy: RoutePolicy
    if (request.is404) {
      policy = SERVICE_POLICY
    } else {
      const config = routeConfig(request)
      policy = (config[kRoutePolicy] as RoutePolicy | undefined) ?? latePolicies.get(config) ?? compileLate(config, request)
    }
    settle(enforcer.check(request, policy), done)
  })

  function compileLate (config: Record<string | symbol, unknown>, request: FastifyRequest): RoutePolicy {
    const policy = compileRoutePolicy(config.consulNative, `${request.method} ${String(request.routeOptions.url)}`, opts.service)
    latePolicies.set(config, policy)
    return policy
  }

  // Backstop: a request that reaches body parsing without a recorded decision (a hook order this
  // plugin did not foresee) is denied, never served.
  fastify.addHook('preParsing', consulNativeBackstop)

  // Fastify opens one extra server per address family when listening on `localhost`; they were
  // built from the same options, and must follow every rotation too.
  fastify.addHook('onListen', function consulNativeOnListen (done) {
    const bindings = serverBindingsOf(fastify)
    if (bindings === null) {
      fastify.log.warn({ consulNative: { event: 'server-bindings-unknown' } },
        'fastify-consul-native: cannot find Fastify\'s extra servers; listen on an explicit host so every server follows certificate rotations')
    } else {
      for (const server of bindings) if (dynamicTlsOf(server) === tls) tls.attach(server)
    }
    done()
  })
  // Registration (option `register`): after the server listens (its address is known then), and
  // a failure fails listen(); on close, the instance leaves the catalog before connections drain.
  if (opts.register !== null) {
    const registerOptions = opts.register
    const healthUrl = opts.health?.url ?? null
    let viaListen = false
    const registerInstance = async (): Promise<void> => {
      const { address, port } = fastify.server.address() as AddressInfo
      const registration = new ServiceRegistration(client, buildRegistration(opts.service, registerOptions, { address, port }, healthUrl), fastify.log)
      await registration.register()
      registration.start()
      sync.registration = registration
    }
    // Fastify's onListen hook cannot fail listen(), so listen() itself is extended...
    extendListen(fastify, registerInstance, () => { viaListen = true })
    // ...which only works when register() was awaited before listen() was called. Otherwise the
    // instance is registered here, and a refusal can only be logged.
    fastify.addHook('onListen', async function consulNativeRegisterLate () {
      if (viaListen) return
      await registerInstance().catch((err: Error) => {
        fastify.log.error({ consulNative: { event: 'register-failed' }, err },
          'fastify-consul-native: could not register the instance (await register() before listen() to make listen() fail instead)')
      })
    })
    fastify.addHook('preClose', async function consulNativeDeregister () {
      await sync.registration?.deregister()
    })
  }

  // While closing, connections close as soon as their last response is sent (see DynamicTls).
  fastify.addHook('preClose', function consulNativeDrain (done) {
    tls.drainConnections()
    done()
  })

  fastify.addHook('onClose', async function consulNativeOnClose () {
    sync.registration?.stop()
    sync.stop()
    tls.detachAll()
    try {
      await outbound.close()
    } finally {
      await client.close()
    }
  })

  if (opts.health !== null) {
    fastify.get(opts.health.url, { config: { consulNative: false } }, async function consulNativeHealth (_request, reply) {
      const status = sync.status()
      reply.code(status.ready ? 200 : 503)
      // Reachable without a certificate: readiness facts only, nothing about certificates or intentions.
      return { status: status.ready ? 'passing' : 'critical', service: status.service, registered: status.registration?.registered ?? null }
    })
  }

  try {
    await sync.start()
  } catch (err) {
    await client.close()
    throw err
  }
  // The main server gets the first material now, before it accepts connections.
  tls.attach(fastify.server)
}

/** Completes a hook with the enforcer's outcome, synchronous in mode 'l7', a promise in mode 'agent'. */
function settle (outcome: Error | null | Promise<Error | null>, done: (err?: Error) => void): void {
  if (outcome instanceof Promise) outcome.then((err) => done(err ?? undefined), done)
  else done(outcome ?? undefined)
}

/** The plugin. Register it on an app created with `Fastify({ https: httpsOptions() })`. */
export const consulNative = fp(consulNativePlugin, { fastify: '5.x', name: 'fastify-consul-native' })
export default consulNative
export { httpsOptions }
export * from './errors'
export type { ConsulNativeOptions, RouteConsulNativeConfig, RoutePermission, RouteSourceInput, HealthRouteOptions } from './options'
export type { RegisterOptions } from './registration'
export type { OutboundFetchInit, OutboundOptions } from './outbound'
export type { AgentOptions } from './agent/config'
export type { CertificatesOptions, AgentCertificatesOptions, FilesCertificatesOptions } from './certificates/options'
export type { ServiceIdentity } from './identity'
export type { Decision, RouteSource } from './intentions/policy'
export type { ConsulNativeStatus } from './sync'
export type { MetricFamily, MetricValue } from './metrics'
export type { HttpsOptionsInput } from './tls'
