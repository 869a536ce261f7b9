// fastify-consul-native: wires the pieces into Fastify. Each concern lives in its own module:
//   agent/ (client, watches) → sync (leaf, roots, intentions) → tls (secure context, identity)
//   → intentions/ (pure decision engine) → enforcement (per-request check) → hooks below.
import type { EventEmitter } from 'node:events'
import type { Dispatcher, Response } from 'undici'
import type { FastifyPluginAsync, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { AgentClient } from './agent/client'
import { resolveAgentConfig, resolveAgentWorker } from './agent/config'
import { createCertificateSource } from './certificates/index'
import { AgentAuthorizer, backstopHook, Enforcer, enforceHook, unroutedRequest } from './enforcement'
import type { ConsulDecision } from './enforcement'
import { InvalidOptionError, NotHttpsError, NotRootError } from './errors'
import type { ExplainInput, Explanation } from './explain'
import { fastifyWebsocketListenerTest, guardCallNotFound, isRootInstance, replacedRouterHandlers, requestIdLabelOf, routerOptionsOf, serverBindingsOf } from './fastify-internals'
import { addHealthRoute } from './health'
import type { ServiceIdentity } from './identity'
import { metricFamilies, prometheusText } from './metrics'
import type { MetricFamily } from './metrics'
import { checkReadyTimeout, resolveOptions } from './options'
import type { ConsulNativeOptions, RouteConsulNativeConfig } from './options'
import { ServiceCaller } from './outbound'
import type { OutboundFetchInit, OutboundOptions } from './outbound'
import { registerOnListen } from './registration'
import { decorateRequestSlots } from './request-slots'
import { RoutePolicies, SERVICE_POLICY } from './route-policy'
import { Rollout } from './rollout'
import { ConsulSync } from './sync'
import type { ConsulNativeStatus } from './sync'
import { attachExtraServers, dynamicTlsOf, httpsOptions } from './tls'
import { deferContinue, gateUpgrades } from './transport'
import type { UpgradeGate } from './transport'
import { UpgradeTracker } from './upgrades'
import { logEvent, pluginLogger } from './log'

/**
 * A verified JWT's payload (claims by name), as jose returns it. Declared here: jose is an ES
 * module only, and a CommonJS declaration file naming its types fails a consumer's type check
 * under moduleResolution node16.
 */
export interface JwtPayload {
  iss?: string
  sub?: string
  aud?: string | string[]
  jti?: string
  nbf?: number
  exp?: number
  iat?: number
  [claim: string]: unknown
}

export interface ConsulNativeDecorator {
  /** Leaf, roots, intentions and per-watch sync state; `ready` once everything is loaded. */
  status (): ConsulNativeStatus
  /**
   * `'tls'` after new certificates or roots are installed, `'intentions'` after a policy or
   * normalization update and `'candidate'` after a candidate is loaded or rejected, each with
   * `status()`; `'sync-error'` with `{ watch, error }` when a poll to the agent fails or an update
   * is rejected (the last good state stays in force); `'jwks'` with `{ provider, keys, error }`
   * after each load or fetch of a JWT provider's key set.
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
  /**
   * Decides a request as the plugin would, with the live intentions, and explains it: the
   * decision, what decided it, and every step in precedence order. With a candidate loaded,
   * `candidate` explains it against the candidate too.
   */
  explain (input: ExplainInput): Explanation & { candidate?: Explanation }
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
    /**
     * Why the request was allowed (set before handlers run). In shadow enforcement a would-be
     * denial that is served keeps `allow: false` and its reason, with `enforced: false`.
     */
    consulDecision: ConsulDecision | null
    /**
     * The verified JWT payloads of the providers the request's JWT requirements looked at, by
     * provider name; null when no requirement applied (docs/semantics.md#jwt-forwarding).
     */
    consulJwt: Record<string, Readonly<JwtPayload>> | null
  }
}

const consulNativePlugin: FastifyPluginAsync<ConsulNativeOptions> = async (fastify, rawOptions) => {
  const opts = resolveOptions(rawOptions)
  // Fastify always sets it; 0 turns the timeout off.
  checkReadyTimeout(opts.readyTimeout, Number(fastify.initialConfig.pluginTimeout))
  const tls = dynamicTlsOf(fastify.server)
  if (tls === null) throw new NotHttpsError()
  if (!isRootInstance(fastify)) throw new NotRootError()
  // Replaced router callbacks answer requests before any hook: the plugin could not decide them.
  const replaced = replacedRouterHandlers(fastify)
  if (replaced.includes('defaultRoute')) {
    throw new InvalidOptionError('routerOptions.defaultRoute', 'answers unmatched requests with no hook, so no caller could be checked there; use setNotFoundHandler, whose handler the plugin protects')
  }

  const log = pluginLogger(fastify.log)
  const requestIdLabel = requestIdLabelOf(fastify)
  const agentConfig = resolveAgentConfig(opts.agent, process.env)
  const client = new AgentClient(agentConfig, {
    datacenter: opts.datacenter,
    namespace: opts.namespace,
    partition: opts.partition,
    worker: resolveAgentWorker(opts.agent)
  })
  const sync = new ConsulSync(opts, client, tls, log, createCertificateSource(opts, client, agentConfig.token, process.env, log))
  for (const option of replaced) {
    logEvent(log, 'warn', 'router-callback-unchecked', { option: `routerOptions.${option}` },
      `routerOptions.${option} answers malformed request targets with no hook: what it sends is not checked against intentions`)
  }
  const router = routerOptionsOf(fastify)
  if (!router.caseSensitive) {
    logEvent(log, 'warn', 'case-insensitive-router', null, 'caseSensitive is false: write intention paths in lower case, as every case spelling is checked in lower case')
  }
  const authorizer = opts.mode === 'agent' ? new AgentAuthorizer(client, opts.service) : null
  if (authorizer !== null) sync.events.on('intentions', () => authorizer.invalidate())
  const routes = new RoutePolicies(router, {
    hasRoute: (route) => fastify.hasRoute(route as Parameters<typeof fastify.hasRoute>[0]),
    log,
    maxRegexProgramSize: opts.maxRegexProgramSize
  })
  const rollout = new Rollout(opts, sync, routes, router, log)
  sync.rollout = () => rollout.status()
  const enforcer = new Enforcer({
    tls, sync, router, authorizer, log, requestIdLabel, logDenials: opts.logDenials, rollout: { enforcement: opts.enforcement, candidate: rollout.candidate }
  })
  const outbound = new ServiceCaller({
    client, tls, tlsEvents: sync.events, log, blockingWait: opts.blockingWait, namespace: opts.namespace, partition: opts.partition
  })

  decorateRequestSlots(fastify)
  const metrics = (): MetricFamily[] => metricFamilies(enforcer.counters, sync.failureCounts, sync.status(), Date.now(), rollout.candidate?.disagreements ?? null)
  fastify.decorate('consulNative', {
    status: () => sync.status(),
    events: sync.events,
    metrics,
    prometheus: () => prometheusText(metrics()),
    fetch: outbound.fetch.bind(outbound),
    dispatcher: outbound.dispatcher.bind(outbound),
    explain: (input: ExplainInput) => rollout.explain(input)
  })

  fastify.addHook('onRoute', (route) => routes.compile(route))
  // docs/semantics.md#transport-long-lived: open WebSockets decided again on every change.
  let upgrades: UpgradeTracker | null = null
  if (opts.recheckUpgrades) {
    const tracker = upgrades = new UpgradeTracker(log)
    /* c8 ignore start */
    // redecide() never rejects (a failed agent call is a deny): only a bug would get here.
    const failed = (err: Error): void => {
      logEvent(log, 'error', 'upgrade-recheck-failed', null, 'could not decide open upgrades again', err)
    }
    /* c8 ignore stop */
    const recheck = (): void => { tracker.recheck((request, route) => enforcer.redecide(request, route)).catch(failed) }
    sync.events.on('intentions', recheck)
    sync.events.on('tls', recheck)
  }
  fastify.addHook('onRequest', enforceHook(enforcer, routes, upgrades))
  // reply.callNotFound() moves a request to the 404 handler past every onRequest hook: decided again
  // there, as a request no route matches (docs/semantics.md#transport-hook-order).
  guardCallNotFound(fastify, (reply) => enforcer.check(reply.request as FastifyRequest, SERVICE_POLICY))
  fastify.addHook('preParsing', backstopHook(log, requestIdLabel))
  // `100 Continue` only after the decision (docs/semantics.md#transport-continue).
  if (!deferContinue(fastify.server)) {
    logEvent(log, 'warn', 'check-continue-taken', null, 'the server already has a \'checkContinue\' listener: it, not the access decision, decides when a body is read')
  }
  // Upgrade and CONNECT requests that reach listeners outside Fastify are decided too (docs/semantics.md#transport-upgrades).
  const isFastifyWebsocketListener = fastifyWebsocketListenerTest()
  const upgradeGate: UpgradeGate = {
    // @fastify/websocket's listener (its `onUpgrade`) sends every Upgrade through Fastify's routing.
    routesThroughFastify: (listener) => fastify.hasPlugin('@fastify/websocket') && isFastifyWebsocketListener(listener),
    decide: (raw) => {
      const request = unroutedRequest(raw)
      const route = SERVICE_POLICY
      // An allowed Upgrade is remembered like one Fastify routes (option recheckUpgrades).
      const settled = (err: Error | null): Error | null => {
        if (err === null) upgrades?.trackIfUpgrade(request, route)
        return err
      }
      const outcome = enforcer.check(request, route)
      return outcome instanceof Promise ? outcome.then(settled) : settled(outcome)
    }
  }
  gateUpgrades(fastify.server, upgradeGate)
  fastify.addHook('onListen', function consulNativeOnListen (done) {
    attachExtraServers(tls, fastify, log)
    // Fastify's extra servers are created at listen: no listener of the application's can be there
    // yet, but Fastify's own forwarder of Upgrades to the main server is, and is gated like one.
    for (const server of serverBindingsOf(fastify) ?? []) {
      if (dynamicTlsOf(server) === tls) {
        deferContinue(server as Parameters<typeof deferContinue>[0])
        gateUpgrades(server as Parameters<typeof gateUpgrades>[0], upgradeGate)
      }
    }
    done()
  })
  if (opts.register !== null) {
    registerOnListen(fastify, { client, sync, service: opts.service, options: opts.register, healthUrl: opts.health?.url ?? null, log })
  }
  // While closing, connections close as soon as their last response is sent (see DynamicTls).
  fastify.addHook('preClose', function consulNativeDrain (done) {
    tls.drainConnections()
    done()
  })
  fastify.addHook('onClose', async function consulNativeOnClose () {
    rollout.stop()
    sync.registration?.stop()
    sync.stop()
    enforcer.close()
    tls.detachAll()
    try {
      await outbound.close()
    } finally {
      await client.close()
    }
  })
  if (opts.health !== null) addHealthRoute(fastify, opts.health.url, sync)

  try {
    await sync.start()
  } catch (err) {
    await client.close()
    throw err
  }
  await rollout.start()
  // The main server gets the first material now, before it accepts connections.
  tls.attach(fastify.server)
}

/** The plugin. Register it on an app created with `Fastify({ https: httpsOptions() })`. */
export const consulNative = fp(consulNativePlugin, { fastify: '5.x', name: 'fastify-consul-native' })
export default consulNative
export { httpsOptions }
export * from './errors'
export type { ConsulNativeOptions, Enforcement, RouteConsulNativeConfig, RoutePermission, RouteSourceInput, RouteJwtRequirement, HealthRouteOptions } from './options'
export type { ConsulDecision } from './enforcement'
export type { CandidateStatus } from './candidate'
export type { ExplainInput, Explanation, TraceStep } from './explain'
export type { KeySetEvent } from './jwt/key-sets'
export type { RegisterOptions } from './registration'
export type { OutboundFetchInit, OutboundOptions, OutboundTimeouts } from './outbound'
export type { AgentOptions } from './agent/config'
export type { CertificatesOptions, AgentCertificatesOptions, ConsulGrpcCertificatesOptions, FilesCertificatesOptions } from './certificates/options'
export type { ServiceIdentity } from './identity'
export type { Decision, RouteSource } from './intentions/policy'
export type { ConsulNativeStatus } from './sync'
export type { MetricFamily, MetricValue } from './metrics'
export type { HttpsOptionsInput } from './tls'
