// The per-request decision: identity from the connection cache, then route overrides, then the
// service's compiled intentions. No agent call, no parsing of intentions, and no allocation on
// the allow path of a canonical request.
import type { FastifyRequest } from 'fastify'
import { LRUCache } from 'lru-cache'
import type { AgentClient } from './agent/client'
import { BadHeaderError, BadPathError, DeniedError, UnauthenticatedError } from './errors'
import { connectionOf } from './identity'
import type { ServiceIdentity } from './identity'
import { decideOverride, decideRequest } from './intentions/policy'
import type { Decision } from './intentions/policy'
import { canonicalPath, routedPath, routerPaths } from './intentions/path'
import type { RouterOptions } from './intentions/path'
import type { RoutePolicy } from './route-policy'
import type { ConsulSync } from './sync'
import type { DynamicTls } from './tls'

export const EXEMPT_DECISION: Decision = Object.freeze({ allow: true, reason: 'route exempt (config.consulNative: false)' })
const UNAUTHENTICATED_DECISION: Decision = Object.freeze({ allow: false, reason: 'unauthenticated' })
const BAD_PATH_DECISION: Decision = Object.freeze({ allow: false, reason: 'path rejected by the mesh request normalization' })
const BAD_HEADER_DECISION: Decision = Object.freeze({ allow: false, reason: 'header name with an underscore rejected by the mesh request normalization' })

// mode 'agent': one authorize call per caller URI at most every AUTHORIZE_TTL_MS (coalescing
// bursts of new connections), and one decision per connection for its lifetime, as L4 does.
const AUTHORIZE_CACHE_MAX = 10_000
const AUTHORIZE_TTL_MS = 1_000
const FAILED_CALLS = new WeakSet<Decision>()

/** Cumulative request outcomes, read by `fastify.consulNative.metrics()`. */
export interface EnforcementCounters {
  allowed: number
  denied: number
  unauthenticated: number
  rejected: number
  exempt: number
}

/** Mutable request view reused across requests: decisions are synchronous, so one suffices. */
interface MutableFacts { method: string, path: string, url: string, rawHeaders: readonly string[] }

export class Enforcer {
  readonly #tls: DynamicTls
  readonly #sync: ConsulSync
  readonly #router: RouterOptions
  readonly #facts: MutableFacts = { method: '', path: '', url: '', rawHeaders: [] }
  readonly #authorize: AgentAuthorizer | null
  /** Plain counters: an increment costs nothing on the request path. */
  readonly counters: EnforcementCounters = { allowed: 0, denied: 0, unauthenticated: 0, rejected: 0, exempt: 0 }

  constructor (tls: DynamicTls, sync: ConsulSync, router: RouterOptions, authorize: AgentAuthorizer | null = null) {
    this.#tls = tls
    this.#sync = sync
    this.#router = router
    this.#authorize = authorize
  }

  /**
   * Decides one request, records `request.consulSource` and `request.consulDecision`, and returns
   * the error to answer with, or null to let the request through.
   */
  check (request: FastifyRequest, route: RoutePolicy): Error | null | Promise<Error | null> {
    const raw = request.raw
    const peer = this.#tls.identities.peer(raw, Date.now())
    const identity = peer.identity
    request.consulSource = identity
    if (route.exempt) {
      this.counters.exempt++
      request.consulDecision = EXEMPT_DECISION
      return null
    }
    if (identity === null) {
      request.consulDecision = UNAUTHENTICATED_DECISION
      request.log.info({ consulNative: { event: 'unauthenticated', route: request.routeOptions.url, method: raw.method, path: raw.url, reason: peer.reason } },
        'fastify-consul-native: request without a verified service identity')
      this.counters.unauthenticated++
      return new UnauthenticatedError()
    }
    const policy = this.#sync.policy

    const url = raw.url as string
    const path = canonicalPath(url, this.#sync.normalization)
    if (path === null) {
      request.consulDecision = BAD_PATH_DECISION
      request.log.info({ consulNative: { event: 'bad-path', source: identity.uri, method: raw.method, path: url } },
        'fastify-consul-native: path rejected by the mesh request normalization')
      this.counters.rejected++
      return new BadPathError()
    }
    let rawHeaders = raw.rawHeaders
    const underscores = this.#sync.normalization?.HeadersWithUnderscoresAction
    if ((underscores === 'REJECT_REQUEST' || underscores === 'DROP_HEADER') && hasUnderscoreName(rawHeaders)) {
      // Envoy acts on these before RBAC; so does the plugin, and the handler sees the same request.
      if (underscores === 'REJECT_REQUEST') {
        request.consulDecision = BAD_HEADER_DECISION
        request.log.info({ consulNative: { event: 'bad-header', source: identity.uri, method: raw.method, path: url } },
          'fastify-consul-native: header name with an underscore rejected by the mesh request normalization')
        this.counters.rejected++
        return new BadHeaderError()
      }
      rawHeaders = dropUnderscoreHeaders(raw)
    }
    const facts = this.#facts
    facts.method = raw.method as string
    // A ':path' header matcher sees the normalized path with the query, as Envoy's RBAC does.
    facts.url = isPathOf(url, path) ? url : path + queryOf(url)
    facts.rawHeaders = rawHeaders
    facts.path = path
    if (this.#authorize !== null) {
      // mode 'agent': route overrides still decide first; otherwise the agent does, per connection.
      const overridden = route.override === null ? null : decideOverride(route.override, identity, facts, policy)
      facts.rawHeaders = EMPTY
      if (overridden !== null) return this.#settle(request, identity, overridden)
      return this.#authorize.decide(request, identity).then((decision) => this.#settle(request, identity, decision))
    }
    // docs/semantics.md#router-spellings: the canonical path decides, and every other spelling the router treats alike (per its
    // options) can only add a denial. The router dispatched on the path as sent, though: when
    // that differs structurally (dot segments, backslashes), it must be allowed in its own right.
    const router = route.router ?? this.#router
    let decision = decideRequest(policy, route.override, identity, facts, routerPaths(path, router))
    if (decision.allow) {
      const routed = routedPath(url)
      if (routed !== null && routed !== path) {
        facts.path = routed
        decision = decideRequest(policy, route.override, identity, facts, routerPaths(routed, router))
      }
    }
    facts.rawHeaders = EMPTY
    return this.#settle(request, identity, decision)
  }

  #settle (request: FastifyRequest, identity: ServiceIdentity, decision: Decision): Error | null {
    if (!decision.allow) return this.#deny(request, identity, decision)
    this.counters.allowed++
    request.consulDecision = decision
    const raw = request.raw
    if (isDebug(request.log)) {
      request.log.debug({ consulNative: { event: 'allowed', source: identity.uri, route: request.routeOptions.url, method: raw.method, path: raw.url, reason: decision.reason } },
        'fastify-consul-native: request allowed')
    }
    return null
  }

  #deny (request: FastifyRequest, identity: ServiceIdentity, decision: Decision): Error {
    this.counters.denied++
    request.consulDecision = decision
    const raw = request.raw
    request.log.info({ consulNative: { event: 'denied', source: identity.uri, route: request.routeOptions.url, method: raw.method, path: raw.url, reason: decision.reason } },
      'fastify-consul-native: request denied')
    return new DeniedError()
  }
}

const EMPTY: readonly string[] = []

/** `url` is `path`, possibly followed by a query or fragment. */
function isPathOf (url: string, path: string): boolean {
  if (url.length === path.length) return url === path
  const next = url.charCodeAt(path.length)
  return (next === 63 || next === 35) && url.startsWith(path)
}

function queryOf (url: string): string {
  const q = url.indexOf('?')
  return q === -1 ? '' : url.slice(q)
}

/**
 * `preParsing` backstop: a request that reaches body parsing without a recorded decision (a hook
 * order this plugin did not foresee) is denied, never served.
 */
export function consulNativeBackstop<T> (request: FastifyRequest, _reply: unknown, payload: T, done: (err: Error | null, payload?: T) => void): void {
  if (request.consulDecision !== null) {
    done(null, payload)
    return
  }
  request.log.error({ consulNative: { event: 'no-decision', method: request.method, path: request.url } },
    'fastify-consul-native: no access decision was recorded for this request; denying')
  done(new DeniedError())
}

function hasUnderscoreName (rawHeaders: readonly string[]): boolean {
  for (let i = 0; i < rawHeaders.length; i += 2) if ((rawHeaders[i] as string).includes('_')) return true
  return false
}

/** Removes headers whose name has an underscore, from the matching view and from `req.headers`. */
function dropUnderscoreHeaders (raw: FastifyRequest['raw']): string[] {
  const kept: string[] = []
  const rawHeaders = raw.rawHeaders
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i] as string
    if (name.includes('_')) delete raw.headers[name.toLowerCase()]
    else kept.push(name, rawHeaders[i + 1] as string)
  }
  return kept
}

/** pino exposes isLevelEnabled; other loggers Fastify accepts may not, and then get the line. */
function isDebug (log: FastifyRequest['log']): boolean {
  const check = (log as { isLevelEnabled?: (level: string) => boolean }).isLevelEnabled
  return check === undefined || check.call(log, 'debug')
}

/**
 * `mode: 'agent'`: the agent's authorize endpoint decides, once per connection (L4 semantics:
 * the agent treats L7 intentions as deny). A failed call denies and is not cached.
 */
export class AgentAuthorizer {
  readonly #client: AgentClient
  readonly #service: string
  #byConnection = new WeakMap<object, Promise<Decision>>()
  readonly #byCaller = new LRUCache<string, Promise<Decision>>({ max: AUTHORIZE_CACHE_MAX, ttl: AUTHORIZE_TTL_MS })

  constructor (client: AgentClient, service: string) {
    this.#client = client
    this.#service = service
  }

  /**
   * Forgets every cached answer: after an intentions change, open connections are asked again
   * (a sidecar would drain them), so a revoked caller loses access on its next request.
   */
  invalidate (): void {
    this.#byConnection = new WeakMap()
    this.#byCaller.clear()
  }

  decide (request: FastifyRequest, identity: ServiceIdentity): Promise<Decision> {
    const connection = connectionOf(request.raw)
    let pending = this.#byConnection.get(connection)
    if (pending === undefined) {
      const asked = this.#byCaller.get(identity.uri) ?? this.#ask(identity.uri)
      this.#byConnection.set(connection, asked)
      // A failed call is not the connection's answer: ask again on its next request.
      pending = asked.then((decision) => {
        if (FAILED_CALLS.has(decision)) this.#byConnection.delete(connection)
        return decision
      })
    }
    return pending
  }

  #ask (uri: string): Promise<Decision> {
    const pending = this.#client.authorize(this.#service, uri).then(
      (res): Decision => Object.freeze({ allow: res.Authorized, reason: `agent authorize: ${res.Reason}` }),
      (err: Error): Decision => {
        this.#byCaller.delete(uri)
        const decision = Object.freeze({ allow: false, reason: `agent authorize failed: ${err.message}` })
        FAILED_CALLS.add(decision)
        return decision
      })
    this.#byCaller.set(uri, pending)
    return pending
  }
}
