// The per-request hook's work: resolve the caller's identity from the connection cache, ask the
// pure request decision (lib/intentions/request.ts), and apply its verdict in one place: counter,
// log line, error. No agent call (except mode 'agent'); on the allow path of a canonical request,
// two small short-lived objects (the request view, and the facts the engine's matchers read) and
// nothing else.
import type { FastifyReply, FastifyRequest, onRequestHookHandler } from 'fastify'
import { LRUCache } from 'lru-cache'
import type { AgentClient } from './agent/client'
import type { Candidate } from './candidate'
import { BadHeaderError, BadPathError, DeniedError, UnauthenticatedError } from './errors'
import { connectionOf } from './identity'
import type { PeerIdentity, ServiceIdentity } from './identity'
import { failedJwtRequirement } from './intentions/policy'
import type { Decision } from './intentions/policy'
import { requirementFailures } from './intentions/jwt'
import { headerValue } from './intentions/matchers'
import type { RouterOptions } from './intentions/path'
import { decideRequest, jwtProvidersNeeded, newVerdict } from './intentions/request'
import type { RequestOutcome, RequestView, ServiceRules } from './intentions/request'
import type { RequestTokens } from './jwt/request-tokens'
import { setRequestTokens } from './request-slots'
import type { Enforcement } from './options'
import { SERVICE_POLICY } from './route-policy'
import type { RoutePolicies, RoutePolicy } from './route-policy'
import type { ConsulSync } from './sync'
import type { DynamicTls } from './tls'
import { closeRefused, continueIfAwaited } from './transport'
import type { UpgradeTracker } from './upgrades'
import { logEvent } from './log'
import type { EventSink, LogEvent } from './log'
import { LogLimiter, SUPPRESS } from './log-limiter'
import type { LogLimit } from './log-limiter'

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
  /** Shadow enforcement: would-be 403s and 401s that were served (docs/semantics.md#rollout-shadow). */
  shadowDenied: number
  shadowUnauthenticated: number
}

/** `request.consulDecision`: `enforced: false` marks a shadowed would-be denial that was served. */
export interface ConsulDecision extends Decision {
  readonly enforced?: false
}

type FinalOutcome = Exclude<RequestOutcome, 'ask-agent'>

/**
 * What a final outcome does: the counter it adds to, its log line (event name, message; `limited`
 * lines are written at info through the `logDenials` limiter, the others at debug) and the error
 * it answers with.
 */
interface OutcomeEffect {
  readonly counter: keyof EnforcementCounters
  readonly event: LogEvent | null
  readonly limited: boolean
  readonly message: string
  readonly error: (() => Error) | null
}

const EFFECTS: Readonly<Record<FinalOutcome, OutcomeEffect>> = {
  allow: { counter: 'allowed', event: 'allowed', limited: false, message: 'request allowed', error: null },
  exempt: { counter: 'exempt', event: null, limited: false, message: '', error: null },
  deny: { counter: 'denied', event: 'denied', limited: true, message: 'request denied', error: () => new DeniedError() },
  unauthenticated: {
    counter: 'unauthenticated',
    event: 'unauthenticated',
    limited: true,
    message: 'request without a verified service identity',
    error: () => new UnauthenticatedError()
  },
  'bad-path': {
    counter: 'rejected',
    event: 'bad-path',
    limited: true,
    message: 'path rejected by the mesh request normalization',
    error: () => new BadPathError()
  },
  'bad-header': {
    counter: 'rejected',
    event: 'bad-header',
    limited: true,
    message: 'request rejected for its headers (an underscore in a name, or an ambiguous header)',
    error: () => new BadHeaderError()
  }
}

/** Shadow enforcement: what a would-be 403 or 401 does instead (the request is served). */
const SHADOW_EFFECTS: Readonly<Record<'deny' | 'unauthenticated', OutcomeEffect>> = {
  deny: { counter: 'shadowDenied', event: 'shadow-denied', limited: true, message: 'request would be denied (shadow enforcement: served)', error: null },
  unauthenticated: {
    counter: 'shadowUnauthenticated',
    event: 'shadow-unauthenticated',
    limited: true,
    message: 'request without a verified service identity (shadow enforcement: served)',
    error: null
  }
}

/** The shadowed copy of each denial decision (decisions are frozen and shared, so the copies are too). */
const SHADOWED = new WeakMap<Decision, ConsulDecision>()

function shadowed (decision: Decision): ConsulDecision {
  let copy = SHADOWED.get(decision)
  if (copy === undefined) SHADOWED.set(decision, copy = Object.freeze({ allow: decision.allow, reason: decision.reason, enforced: false }))
  return copy
}

/** The route of a request that matched none, in log lines and limiter keys. */
export const NOT_FOUND_ROUTE = '(not found)'

/** The plugin's logger as the Enforcer uses it. */
export type EnforcerLog = EventSink & { isLevelEnabled?: (level: string) => boolean }

export interface EnforcerOptions {
  readonly tls: DynamicTls
  readonly sync: ConsulSync
  readonly router: RouterOptions
  /** mode 'agent': asks the agent when no route override decides. */
  readonly authorizer: AgentAuthorizer | null
  /** The plugin's logger (lib/log.ts). */
  readonly log: EnforcerLog
  /** Fastify's request id label (`reqId` unless configured). */
  readonly requestIdLabel: string
  /** The `logDenials` option; shadowed would-be denials are limited alike, by a limiter of their own. */
  readonly logDenials: LogLimit
  readonly rollout: RolloutSettings
}

/** The plugin's rollout settings the per-request check applies. */
export interface RolloutSettings {
  /** The plugin's `enforcement` option; a route's own setting wins. */
  enforcement: Enforcement
  candidate: Candidate | null
}

export class Enforcer {
  readonly #tls: DynamicTls
  readonly #sync: ConsulSync
  readonly #authorize: AgentAuthorizer | null
  readonly #log: EnforcerLog
  readonly #requestIdLabel: string
  readonly #debugOn: () => boolean
  readonly #denials: LogLimiter
  readonly #shadowDenials: LogLimiter
  /** Candidate disagreements are logged under the same limits, by a limiter of their own. */
  readonly #disagreements: LogLimiter
  /** Reused across requests: decisions are synchronous, so one of each suffices. */
  readonly #service: ServiceRules
  readonly #verdict = newVerdict()
  readonly #enforcement: Enforcement
  readonly #candidate: Candidate | null
  /** The candidate's service inputs and verdict, reused like the live ones. */
  readonly #candidateService: ServiceRules
  readonly #candidateVerdict = newVerdict()
  /** Plain counters: an increment costs nothing on the request path. */
  readonly counters: EnforcementCounters = { allowed: 0, denied: 0, unauthenticated: 0, rejected: 0, exempt: 0, shadowDenied: 0, shadowUnauthenticated: 0 }

  constructor (opts: EnforcerOptions) {
    const { tls, sync, router, authorizer, log } = opts
    const rollout = opts.rollout
    this.#tls = tls
    this.#sync = sync
    this.#authorize = authorizer
    this.#log = log
    this.#requestIdLabel = opts.requestIdLabel
    this.#debugOn = debugCheck(log)
    const summary = (kind: string) => (suppressed: number): void => logEvent(log, 'info', 'denials-suppressed', { suppressed },
      `${suppressed} ${kind} request line(s) left out (option logDenials)`)
    this.#denials = new LogLimiter(opts.logDenials, { onSummary: summary('denied, unauthenticated or rejected') })
    this.#shadowDenials = new LogLimiter(opts.logDenials, { onSummary: summary('shadow-denied or shadow-unauthenticated') })
    this.#disagreements = new LogLimiter(opts.logDenials, { onSummary: summary('candidate-disagrees') })
    this.#service = { policy: sync.policy, normalization: sync.normalization, router, agentDecides: authorizer !== null }
    this.#enforcement = rollout.enforcement
    this.#candidate = rollout.candidate
    this.#candidateService = { policy: sync.policy, normalization: null, router, agentDecides: false }
  }

  /** Stops the pending summaries of left-out lines. */
  close (): void {
    this.#denials.close()
    this.#shadowDenials.close()
    this.#disagreements.close()
  }

  /**
   * Decides one request, records `request.consulSource` and `request.consulDecision`, and returns
   * the error to answer with, or null to let the request through.
   */
  check (request: FastifyRequest, route: RoutePolicy): Error | null | Promise<Error | null> {
    const raw = request.raw
    const now = Date.now()
    const peer = this.#tls.identities.peer(raw, now)
    request.consulSource = peer.identity
    const tokens = this.#tokens(request, route, peer, now)
    // The candidate's own providers, verified apart: the live decision, what the handler sees and
    // when it answers never depend on the candidate (docs/semantics.md#rollout-candidate).
    const extra = this.#candidate === null ? null : this.#candidateTokens(request, route, peer, now)
    if (tokens instanceof Promise) return tokens.then((t) => this.#decide(request, route, peer, t, extra))
    return this.#decide(request, route, peer, tokens, extra)
  }

  /** Tokens for the providers only the candidate asks for this caller: null when there are none. */
  #candidateTokens (request: FastifyRequest, route: RoutePolicy, peer: PeerIdentity, now: number): RequestTokens | null | Promise<RequestTokens> {
    const candidate = this.#candidate as Candidate
    if (candidate.policy === null) return null
    const service = this.#candidateService
    service.policy = candidate.policy
    const live = jwtProvidersNeeded(this.#service, route, peer.identity)
    return this.#verify(request, jwtProvidersNeeded(service, route, peer.identity).filter((name) => !live.includes(name)), now)
  }

  /**
   * The request's tokens, verified (I/O, asynchronous) before the decision, for the providers the
   * deciding rule names only: null, at no cost, for a caller whose rule has no JWT requirement.
   */
  #tokens (request: FastifyRequest, route: RoutePolicy, peer: PeerIdentity, now: number): RequestTokens | null | Promise<RequestTokens> {
    const service = this.#service
    service.policy = this.#sync.policy
    return this.#verify(request, jwtProvidersNeeded(service, route, peer.identity), now)
  }

  /** The request's tokens for `providers`: null when there are none. */
  #verify (request: FastifyRequest, providers: readonly string[], now: number): RequestTokens | null | Promise<RequestTokens> {
    if (providers.length === 0) return null
    const raw = request.raw
    // A query token is looked for in the target as sent, as Envoy would (Fastify's rewriteUrl may change it).
    return this.#sync.jwt.tokensFor({ rawHeaders: raw.rawHeaders, url: targetAsSent(raw) ?? raw.url as string, connection: connectionOf(raw) }, providers, now)
  }

  /**
   * The request as the engine sees it, and the service rules set to those in force now. A new
   * object each time: filling a long-lived one with this request's strings costs a write barrier
   * per field, more than the young allocation.
   */
  #viewOf (request: FastifyRequest, peer: PeerIdentity, tokens: RequestTokens | null): RequestView {
    const raw = request.raw
    const service = this.#service
    service.policy = this.#sync.policy
    service.normalization = this.#sync.normalization
    // Set by Fastify's rewriteUrl only: then the target as sent decides (docs/semantics.md#paths-rewrite).
    const original = targetAsSent(raw)
    return {
      caller: peer.identity,
      method: raw.method as string,
      url: original ?? raw.url as string,
      routedUrl: original === undefined ? null : raw.url,
      rawHeaders: raw.rawHeaders,
      jwt: tokens,
      callerRules: peer.rules
    }
  }

  #decide (request: FastifyRequest, route: RoutePolicy, peer: PeerIdentity, tokens: RequestTokens | null,
    candidateTokens: RequestTokens | null | Promise<RequestTokens> = null): Error | null | Promise<Error | null> {
    // An asynchronous verification may end after an update: decide with what is in force now.
    const view = this.#viewOf(request, peer, tokens)
    const verdict = decideRequest(this.#service, route, view, this.#verdict)
    const candidate = this.#candidate
    // The candidate is decided only where the intentions decide: exemption, identity and
    // normalization do not depend on them (docs/semantics.md#rollout-candidate).
    if (candidate !== null && candidate.policy !== null && (verdict.outcome === 'allow' || verdict.outcome === 'deny')) {
      const liveDecision = verdict.decision
      // Tokens only the candidate needs are still being verified: compared once they are in, never
      // holding up the live answer.
      if (candidateTokens instanceof Promise) {
        candidateTokens.then((extra) => { this.#compare(request, peer, candidate, route, view, liveDecision, extra) }, ignoreFailure)
      } else {
        this.#compare(request, peer, candidate, route, view, liveDecision, candidateTokens)
      }
    }
    if (verdict.dropUnderscoreHeaders) dropUnderscoreHeaders(request.raw)
    const outcome = verdict.outcome
    if (outcome === 'ask-agent') {
      return (this.#authorize as AgentAuthorizer).decide(request, peer.identity as ServiceIdentity)
        .then((decision) => this.#apply(request, peer, route, decision.allow ? 'allow' : 'deny', decision, tokens))
    }
    return this.#apply(request, peer, route, outcome, verdict.decision, tokens)
  }

  /** Decides the request again against the candidate; counts and logs a disagreement. */
  #compare (request: FastifyRequest, peer: PeerIdentity, candidate: Candidate, route: RoutePolicy, view: RequestView, theirs: Decision,
    extra: RequestTokens | null): void {
    const service = this.#candidateService
    service.policy = candidate.policy as NonNullable<Candidate['policy']>
    service.normalization = this.#service.normalization
    const liveTokens = view.jwt ?? null
    const jwt = extra === null
      ? liveTokens
      : { payload: (name: string) => extra.payload(name) ?? liveTokens?.payload(name) ?? null, ambiguity: extra.ambiguity ?? liveTokens?.ambiguity ?? null }
    // The caller's memo is the live policy's: the candidate looks its rule up.
    const mine = decideRequest(service, route, { ...view, callerRules: null, jwt }, this.#candidateVerdict).decision
    if (mine.allow === theirs.allow) return
    if (theirs.allow) candidate.disagreements.allowDeny++
    else candidate.disagreements.denyAllow++
    const source = (peer.identity as ServiceIdentity).uri
    const routeName = request.is404 ? NOT_FOUND_ROUTE : request.routeOptions.url as string
    // Sampled like denials (docs/semantics.md#rollout-candidate); the counter stays exact.
    const suppressed = this.#disagreements.admit(`${source} ${routeName} ${theirs.allow ? 'allow' : 'deny'}`, Date.now())
    if (suppressed === SUPPRESS) return
    const raw = request.raw
    logEvent(this.#log, 'info', 'candidate-disagrees', {
      source,
      route: routeName,
      method: raw.method,
      path: raw.url,
      live: theirs.allow ? 'allow' : 'deny',
      liveReason: theirs.reason,
      candidate: mine.allow ? 'allow' : 'deny',
      candidateReason: mine.reason,
      ...(suppressed > 0 ? { suppressed } : null)
    }, 'the candidate intentions decide this request differently', undefined, { label: this.#requestIdLabel, id: request.id })
  }

  /**
   * Decides an earlier request again with the identity, intentions and settings in force now,
   * without counting or logging it (docs/semantics.md#transport-long-lived).
   */
  redecide (request: FastifyRequest, route: RoutePolicy): boolean | Promise<boolean> {
    const raw = request.raw
    const now = Date.now()
    const peer = this.#tls.identities.peer(raw, now)
    // The token is checked again too: an expired one or a removed key ends the access.
    const tokens = this.#tokens(request, route, peer, now)
    if (tokens instanceof Promise) return tokens.then((t) => this.#redecide(request, route, peer, t))
    return this.#redecide(request, route, peer, tokens)
  }

  #redecide (request: FastifyRequest, route: RoutePolicy, peer: PeerIdentity, tokens: RequestTokens | null): boolean | Promise<boolean> {
    const view = this.#viewOf(request, peer, tokens)
    const outcome = decideRequest(this.#service, route, view, this.#verdict).outcome
    // Shadow enforcement keeps serving what it would deny, open connections included.
    const shadow = (route.enforcement ?? this.#enforcement) === 'shadow'
    if (outcome === 'ask-agent') {
      return (this.#authorize as AgentAuthorizer).decide(request, peer.identity as ServiceIdentity).then((decision) => decision.allow || shadow)
    }
    return outcome === 'allow' || outcome === 'exempt' || (shadow && (outcome === 'deny' || outcome === 'unauthenticated'))
  }

  /** The one place an outcome becomes a counter, a log line and an error. */
  #apply (request: FastifyRequest, peer: PeerIdentity, route: RoutePolicy, outcome: FinalOutcome, decision: Decision,
    tokens: RequestTokens | null): Error | null {
    // The common case first, with nothing to look up: an allow without tokens, no debug line.
    if (outcome === 'allow' && tokens === null && !this.#debugOn()) {
      request.consulDecision = decision
      this.counters.allowed++
      return null
    }
    let effect = EFFECTS[outcome]
    let limiter = this.#denials
    const decided = decision
    if (tokens !== null && outcome === 'allow') applyTokens(request, tokens)
    // Shadow enforcement serves would-be 403s and 401s; a 400 of the request normalization is
    // never shadowed (docs/semantics.md#rollout-shadow).
    if ((outcome === 'deny' || outcome === 'unauthenticated') && (route.enforcement ?? this.#enforcement) === 'shadow') {
      effect = SHADOW_EFFECTS[outcome]
      decision = shadowed(decision)
      limiter = this.#shadowDenials
      // Served, so read as an allowed request is: the caller's own forwarding header and the
      // token headers that are not forwarded are removed (docs/semantics.md#jwt-forwarding).
      if (tokens !== null) applyTokens(request, tokens)
    }
    request.consulDecision = decision
    this.counters[effect.counter]++
    const event = effect.event
    if (event === null) return null
    if (!effect.limited) {
      if (this.#debugOn()) this.#write(request, peer, decision, effect, 'debug', event, 0, null)
      return null
    }
    const routeName = request.is404 ? NOT_FOUND_ROUTE : request.routeOptions.url as string
    const caller = peer.identity === null ? `unauthenticated/${addressClass(request.raw.socket.remoteAddress)}` : peer.identity.uri
    const suppressed = limiter.admit(`${event} ${caller} ${routeName}`, Date.now())
    if (suppressed !== SUPPRESS) this.#write(request, peer, decision, effect, 'info', event, suppressed, tokens === null ? null : jwtLogField(decided, tokens))
    return effect.error === null ? null : effect.error()
  }

  #write (request: FastifyRequest, peer: PeerIdentity, decision: Decision, effect: OutcomeEffect, level: 'debug' | 'info',
    event: LogEvent, suppressed: number, jwt: Record<string, string> | null): void {
    const raw = request.raw
    const fields = {
      source: peer.identity === null ? null : peer.identity.uri,
      route: request.is404 ? NOT_FOUND_ROUTE : request.routeOptions.url,
      method: raw.method,
      path: raw.url,
      // Without an identity, the decision says only 'unauthenticated': the log says why.
      reason: peer.identity === null ? peer.reason : decision.reason,
      ...(suppressed > 0 ? { suppressed } : null),
      // Which provider failed and why; never the token (docs/semantics.md#jwt-match).
      ...(jwt !== null ? { jwt } : null)
    }
    logEvent(this.#log, level, event, fields, effect.message, undefined, { label: this.#requestIdLabel, id: request.id })
  }
}

/** The target as the client sent it, when Fastify's `rewriteUrl` changed `raw.url`; else undefined. */
function targetAsSent (raw: FastifyRequest['raw']): string | undefined {
  return (raw as { originalUrl?: string }).originalUrl
}

/**
 * The log's `jwt` field: why each provider failed, for the tokens that did not verify and, when
 * `decision` reports a failed requirement, for its providers' claims too; null when there is nothing to say.
 */
function jwtLogField (decision: Decision, tokens: RequestTokens): Record<string, string> | null {
  const requirement = failedJwtRequirement(decision)
  const field = requirement === undefined ? tokens.failures : { ...tokens.failures, ...requirementFailures(requirement, tokens, tokens.failures) }
  return Object.keys(field).length > 0 ? field : null
}

/**
 * What the logDenials limiter keys an unauthenticated caller by: the kind of network it calls
 * from, not its address, so that a caller spraying addresses cannot make every line "new".
 */
export function addressClass (address: string | undefined): 'loopback' | 'private' | 'link-local' | 'public' | 'unknown' {
  if (address === undefined) return 'unknown'
  const v4 = address.startsWith('::ffff:') ? address.slice(7) : address
  if (v4.includes('.')) {
    const [a, b] = v4.split('.').map(Number) as [number, number]
    if (a === 127) return 'loopback'
    if (a === 10 || (a === 172 && b >= 16 && b <= 31) || (a === 192 && b === 168)) return 'private'
    if (a === 169 && b === 254) return 'link-local'
    return 'public'
  }
  const lower = address.toLowerCase()
  if (lower === '::1') return 'loopback'
  if (/^f[cd]/.test(lower)) return 'private'
  if (/^fe[89ab]/.test(lower)) return 'link-local'
  return 'public'
}

/**
 * The one global onRequest hook: decides every request before any body is read, on routes
 * declared before the plugin and on 404s too (so an unauthenticated caller cannot tell which
 * routes exist). Synchronous in mode 'l7' unless a token must be verified first; mode 'agent' may wait for the agent.
 */
export function enforceHook (enforcer: Enforcer, routes: RoutePolicies, upgrades: UpgradeTracker | null = null): onRequestHookHandler {
  /**
   * Completes the hook with the enforcer's outcome: an allowed request that waits for `100 Continue`
   * gets it, an allowed Upgrade is tracked (option `recheckUpgrades`); a refused request does not
   * hold its connection open (docs/semantics.md#transport).
   */
  function settle (request: FastifyRequest, reply: FastifyReply, route: RoutePolicy, err: Error | null, done: (err?: Error) => void,
    also: RoutePolicy | null): void {
    if (err === null) {
      continueIfAwaited(request.raw, reply.raw)
      if (upgrades !== null) upgrades.trackIfUpgrade(request, route, also)
      done()
      return
    }
    closeRefused(request.raw, reply.raw)
    done(err)
  }
  /**
   * Decides with `route` and completes the hook. `also`: the route whose own setting the request
   * needs as well (an Upgrade to a route that is no WebSocket route): rechecked with it, and when
   * `route` is that route's refusal asked again and allows after all, the service decides next.
   */
  function decide (request: FastifyRequest, reply: FastifyReply, route: RoutePolicy, done: (err?: Error) => void, also: RoutePolicy | null = null): void {
    const outcome = enforcer.check(request, route)
    if (outcome instanceof Promise) outcome.then((err) => { next(request, reply, route, err, done, also) }, done)
    else next(request, reply, route, outcome, done, also)
  }
  function next (request: FastifyRequest, reply: FastifyReply, route: RoutePolicy, err: Error | null, done: (err?: Error) => void,
    also: RoutePolicy | null): void {
    if (err === null && also === route) decide(request, reply, SERVICE_POLICY, done, route)
    else settle(request, reply, route, err, done, also)
  }
  return function consulNativeOnRequest (request, reply, done) {
    const route = routes.of(request)
    // An Upgrade to a route that is no WebSocket route still reaches the app's WebSocket server
    // (@fastify/websocket hands it every Upgrade, then closes it): the route's own setting
    // (exemption, override, shadow enforcement) does not cover that, the service's policy decides
    // too (docs/semantics.md#transport-upgrades). The route's own decision is asked first, without
    // counting it: a refusal there is the route's, and is answered as such.
    if (route === SERVICE_POLICY || route.websocket === true || !isUpgrade(request.raw, route.exempt)) {
      decide(request, reply, route, done)
      return
    }
    // An exemption needs nothing of the caller: the service alone decides (and rechecks).
    if (route.exempt) {
      decide(request, reply, SERVICE_POLICY, done)
      return
    }
    const own = enforcer.redecide(request, route)
    // Refused by the route: decided again to answer and count it as the route's refusal; should an
    // update (new keys, new intentions) have made the route allow it meanwhile, the service decides too.
    const afterOwn = (allowed: boolean): void => { decide(request, reply, allowed ? SERVICE_POLICY : route, done, route) }
    if (own instanceof Promise) own.then(afterOwn, done)
    else afterOwn(own)
  }
}

/**
 * Whether a request to a route with a setting of its own is an Upgrade: Node's flag, set when it
 * hands the request to 'upgrade' listeners (@fastify/websocket's routes it back through Fastify).
 * An exempt route (a health check, reached without a certificate) counts any Upgrade header, read
 * from rawHeaders: Node builds `req.headers` on first use, an object per request it would not need.
 */
function isUpgrade (raw: FastifyRequest['raw'], exempt: boolean): boolean {
  if (exempt) return headerValue(raw.rawHeaders, 'upgrade') !== undefined
  return (raw as { upgrade?: boolean }).upgrade === true
}

// tokensFor settles with reasons and never rejects; should a bug make it, the candidate's comparison
// is skipped rather than the process crashed by an unhandled rejection.
/* c8 ignore next */
function ignoreFailure (): void {}

let unroutedSerial = 0

/**
 * An Upgrade or CONNECT request that Node hands to listeners outside Fastify, shaped as the
 * enforcer reads a request: no route (a 404 in log lines), and an id of its own
 * (docs/semantics.md#transport-upgrades).
 */
export function unroutedRequest (raw: FastifyRequest['raw']): FastifyRequest {
  // An HTTP/2 CONNECT has no :path, so no url: it is decided as an empty target, which no path
  // rule can match (refused as a bad path once the caller is known).
  if (typeof raw.url !== 'string') raw = Object.create(raw, { url: { value: '' } }) as FastifyRequest['raw']
  return {
    raw,
    id: `unrouted-${++unroutedSerial}`,
    is404: true,
    method: raw.method,
    url: raw.url,
    routeOptions: { url: undefined },
    consulSource: null,
    consulDecision: null
  } as unknown as FastifyRequest
}

/**
 * `preParsing` backstop: a request that reaches body parsing without a recorded decision that lets
 * it through (a hook order this plugin did not foresee) is denied, never served. "Without" is null
 * (the decoration's value before the decision) or, defensively, undefined; a decision that lets it
 * through allows it, or is shadowed (docs/semantics.md#transport-hook-order).
 */
export function backstopHook (log: EventSink, requestIdLabel: string) {
  return function consulNativeBackstop<T> (request: FastifyRequest, reply: FastifyReply, payload: T, done: (err: Error | null, payload?: T) => void): void {
    const decision = request.consulDecision
    if (decision != null && (decision.allow || decision.enforced === false)) {
      done(null, payload)
      return
    }
    logEvent(log, 'error', 'no-decision', { route: request.is404 ? NOT_FOUND_ROUTE : request.routeOptions.url, method: request.method, path: request.url },
      decision == null ? 'no access decision was recorded for this request; denying' : 'a request the access decision refused reached body parsing; denying',
      undefined, { label: requestIdLabel, id: request.id })
    closeRefused(request.raw, reply.raw)
    done(new DeniedError())
  }
}

/**
 * An allowed request's tokens, as its handler sees them (docs/semantics.md#jwt-forwarding): the
 * verified payloads on `request.consulJwt`, a token header removed unless its location forwards
 * it, and the `Forwarding.HeaderName` header set to the verified payload (or removed, so a caller
 * cannot send its own).
 */
function applyTokens (request: FastifyRequest, tokens: RequestTokens): void {
  setRequestTokens(request, tokens)
  const headers = request.raw.headers
  for (const name of tokens.forwardHeaders) delete headers[name]
  for (const { provider, found, payload } of tokens.found) {
    const config = provider.config
    if (found.location.kind === 'header' && !found.location.forward) delete headers[found.location.name]
    if (config.forwardHeader !== null && payload !== null) {
      const segment = found.token.split('.')[1] as string
      headers[config.forwardHeader] = config.padForwardPayload ? segment + '='.repeat((4 - segment.length % 4) % 4) : segment
    }
  }
}

/** Removes header names with an underscore from `req.headers`, as they were from the headers matched. */
function dropUnderscoreHeaders (raw: FastifyRequest['raw']): void {
  const rawHeaders = raw.rawHeaders
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i] as string
    if (name.includes('_')) delete raw.headers[name.toLowerCase()]
  }
}

/**
 * Whether a debug line would be written, asked per allowed request. pino exposes isLevelEnabled
 * (its level may change at run time). Fastify's logger when logging is off (abstract-logging)
 * has none, and its methods are one function named `noop`, for good: decided once. Other loggers
 * get the line.
 */
function debugCheck (log: EnforcerLog): () => boolean {
  const check = log.isLevelEnabled
  if (check === undefined) return log.debug.name === 'noop' ? never : always
  return () => check.call(log, 'debug')
}
const never = (): boolean => false
const always = (): boolean => true

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
