// fastify-consul-native: wires the pieces into Fastify. Each concern lives in its own module:
//   agent/ (client, watches) → sync (leaf, roots, intentions) → tls (secure context, identity)
//   → intentions/ (pure decision engine) → enforcement (per-request check) → hooks below.
import type { EventEmitter } from 'node:events'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify'
import fp from 'fastify-plugin'
import { AgentClient } from './agent/client'
import { resolveAgentConfig } from './agent/config'
import { AgentAuthorizer, Enforcer } from './enforcement'
import { InvalidOptionError, NotHttpsError } from './errors'
import type { ServiceIdentity } from './identity'
import type { Decision } from './intentions/policy'
import { routerOptionsOf, serverBindingsOf } from './fastify-servers'
import { resolveOptions } from './options'
import type { ConsulNativeOptions, RouteConsulNativeConfig } from './options'
import { compileRoutePolicy, SERVICE_POLICY } from './route-policy'
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
  const pluginTimeout = fastify.initialConfig.pluginTimeout ?? 0
  if (pluginTimeout > 0 && opts.readyTimeout >= pluginTimeout) {
    throw new InvalidOptionError('readyTimeout', `(${opts.readyTimeout} ms) must be below Fastify's pluginTimeout (${pluginTimeout} ms): lower it or raise pluginTimeout`)
  }
  const tls = dynamicTlsOf(fastify.server)
  if (tls === null) throw new NotHttpsError()

  const client = new AgentClient(resolveAgentConfig(opts.agent, process.env), {
    datacenter: opts.datacenter,
    namespace: opts.namespace,
    partition: opts.partition
  })
  const sync = new ConsulSync(opts, client, tls, fastify.log)
  const enforcer = new Enforcer(tls, sync, routerOptionsOf(fastify),
    opts.mode === 'agent' ? new AgentAuthorizer(client, opts.service) : null)

  fastify.decorateRequest('consulSource', null)
  fastify.decorateRequest('consulDecision', null)
  fastify.decorate('consulNative', { status: () => sync.status(), events: sync })

  // Routes declared from here on get their policy compiled once and checked by a route-level
  // onRequest hook placed before the route's own hooks, so nothing runs for a denied caller.
  fastify.addHook('onRoute', (route) => {
    const name = `${String(route.method)} ${route.url}`
    const policy = compileRoutePolicy(route.config?.consulNative, name, opts.service)
    route.config = { ...route.config, [kRoutePolicy]: policy } as typeof route.config
    const check = function consulNativeOnRequest (request: FastifyRequest, _reply: FastifyReply, done: HookHandlerDoneFunction): void {
      settle(enforcer.check(request, policy), done)
    }
    const existing = route.onRequest
    route.onRequest = existing === undefined ? [check] : [check, ...(Array.isArray(existing) ? existing : [existing])]
  })

  // 404s never pass through onRoute: decide them here, so an unauthenticated caller cannot tell
  // which routes exist.
  fastify.addHook('onRequest', function consulNativeNotFound (request, _reply, done) {
    if (request.is404) settle(enforcer.check(request, SERVICE_POLICY), done)
    else done()
  })

  // Backstop for routes this plugin never saw (declared before it was registered): decide before
  // the body is parsed, compiling their route config on first use.
  const latePolicies = new WeakMap<object, RoutePolicy>()
  fastify.addHook('preParsing', function consulNativeBackstop (request, _reply, payload, done) {
    if (request.consulDecision !== null) {
      done(null, payload)
      return
    }
    const config = request.routeOptions.config as unknown as Record<string | symbol, unknown>
    let policy = latePolicies.get(config) ?? (config[kRoutePolicy] as RoutePolicy | undefined)
    if (policy === undefined) {
      policy = compileRoutePolicy(config.consulNative, `${request.method} ${String(request.routeOptions.url)}`, opts.service)
      latePolicies.set(config, policy)
    }
    settle(enforcer.check(request, policy), (err) => {
      if (err !== undefined) done(err)
      else done(null, payload)
    })
  })

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
  fastify.addHook('onClose', async function consulNativeOnClose () {
    sync.stop()
    tls.detachAll()
    await client.close()
  })

  if (opts.health !== null) {
    fastify.get(opts.health.url, { config: { consulNative: false } }, async function consulNativeHealth (_request, reply) {
      const status = sync.status()
      reply.code(status.ready ? 200 : 503)
      return {
        status: status.ready ? 'passing' : 'critical',
        service: status.service,
        leaf: status.leaf === null ? null : { serial: status.leaf.serial, validBefore: status.leaf.validBefore },
        intentions: status.intentions === null ? null : { count: status.intentions.count, index: status.intentions.index }
      }
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
export type { ConsulNativeOptions, RouteConsulNativeConfig, HealthRouteOptions } from './options'
export type { AgentOptions } from './agent/config'
export type { ServiceIdentity } from './identity'
export type { Decision, RouteSource } from './intentions/policy'
export type { ConsulNativeStatus } from './sync'
export type { HttpsOptionsInput } from './tls'
