// The whole access decision for one request, as one pure call: route exemption, caller identity,
// the mesh request normalization (path, header names), the route override and the service's
// intentions, over every spelling of the path the router treats as the same route. Data in,
// verdict out: no I/O, no clock, no Fastify types; on the allow path of a canonical request, one
// small short-lived object (the facts matchers read) and nothing else. lib/enforcement.ts turns
// the verdict into a counter, a log line and an error.
// Built to grow without a second code path: a shadowed route applies the same verdict differently
// (enforcement.ts); a candidate policy is one more call with another `ServiceRules.policy` and its
// own verdict object; further request checks run with the normalization checks, before intentions,
// each as an outcome of its own; what matchers need of the request (headers, query, cookies) is in
// `RequestView`.
import type { RequestNormalization } from '../agent/wire'
import { headerAmbiguity } from './headers'
import { asciiLower, headerValue } from './matchers'
import { canonicalPath, isPlainTarget, queryOf, routedIfOther, routerPaths, targetAuthority } from './path'
import type { RouterOptions } from './path'
import type { JwtTokens } from './jwt'
import { decideOverrideSpellings, decideSpellings, jwtProvidersFor } from './policy'
import type { CallerIdentity, CompiledOverride, CompiledPolicy, Decision, DecisionTrace, RuleMemo } from './policy'

/**
 * What to do with the request. `'ask-agent'` (mode `'agent'` only): no route override matched,
 * the agent's authorize endpoint decides for the service.
 */
export type RequestOutcome = 'allow' | 'exempt' | 'deny' | 'unauthenticated' | 'bad-path' | 'bad-header' | 'ask-agent'

/** The service-wide inputs: the intentions and mesh settings in force, and the router's options. */
export interface ServiceRules {
  policy: CompiledPolicy
  /** The mesh entry's `HTTP.Incoming.RequestNormalization`; null: Consul's defaults. */
  normalization: RequestNormalization | null
  router: RouterOptions
  /** mode `'agent'`: route overrides decide here, the agent decides for the service. */
  agentDecides: boolean
}

/** A route's compiled settings (see lib/route-policy.ts). */
export interface RouteRules {
  /** `config.consulNative: false`: no identity needed, intentions not checked. */
  readonly exempt: boolean
  readonly override: CompiledOverride | null
  /** The route's router options when they differ from the service's. */
  readonly router?: RouterOptions
}

/** The request as received: what the decision may read of it. */
export interface RequestView {
  /** The verified caller; null when the connection carries no verified identity. */
  caller: CallerIdentity | null
  /** As on the wire: methods are compared case-sensitively. */
  method: string
  /** The raw request target (path and query, as sent). */
  url: string
  /**
   * The target the router dispatched on, when the application rewrote it (Fastify's `rewriteUrl`);
   * absent or null otherwise. The target as sent decides; this one can only add a denial.
   */
  routedUrl?: string | null
  /** Node's `req.rawHeaders`: [name, value, name, value, ...]. */
  rawHeaders: readonly string[]
  /**
   * Tokens verified beforehand for the providers `jwtProvidersNeeded` named (docs/semantics.md#jwt);
   * null or absent when none were needed.
   */
  jwt?: JwtTokens | null
  /**
   * The caller's slot for remembering which rule of the service's policy matches it (see
   * `RuleMemo`); absent or null: looked up every time.
   */
  callerRules?: RuleMemo | null
}

/** The result, written into an object the caller owns and reuses (decisions are synchronous). */
export interface RequestVerdict {
  outcome: RequestOutcome
  /** Why; becomes `request.consulDecision` (for `'ask-agent'`, a placeholder until the agent answers). */
  decision: Decision
  /**
   * `HeadersWithUnderscoresAction: DROP_HEADER` removed header names with an underscore from the
   * headers matched: the caller removes them from the request the handler sees, too.
   */
  dropUnderscoreHeaders: boolean
}

const EXEMPT_DECISION: Decision = Object.freeze({ allow: true, reason: 'route exempt (config.consulNative: false)' })
const UNAUTHENTICATED_DECISION: Decision = Object.freeze({ allow: false, reason: 'unauthenticated' })
const BAD_PATH_DECISION: Decision = Object.freeze({ allow: false, reason: 'path rejected by the mesh request normalization' })
const BAD_HEADER_DECISION: Decision = Object.freeze({ allow: false, reason: 'header name with an underscore rejected by the mesh request normalization' })
const FRAGMENT_DECISION: Decision = Object.freeze({ allow: false, reason: 'request target with a fragment (#) rejected, as by the mesh' })
const TARGET_AUTHORITY_DECISION: Decision = Object.freeze({ allow: false, reason: 'absolute-form request target names another authority than the host header' })
const ASK_AGENT_DECISION: Decision = Object.freeze({ allow: false, reason: 'awaiting the agent\'s authorize answer' })
const AGENT_JWT_DECISION: Decision = Object.freeze({ allow: false, reason: 'the caller\'s intention requires a JWT, which mode \'agent\' cannot enforce (deny)' })

const EMPTY: readonly string[] = Object.freeze([])

interface MutableFacts { method: string, path: string, url: string, rawHeaders: readonly string[], jwt: JwtTokens | null }

/**
 * The JWT providers whose tokens the request's decision may look at, to verify before calling
 * decideRequest (verification is I/O and asynchronous; the decision is neither). Empty for an
 * exempt route, an unauthenticated caller, and whenever no requirement applies to the caller.
 */
export function jwtProvidersNeeded (service: ServiceRules, route: RouteRules, caller: CallerIdentity | null): readonly string[] {
  if (route.exempt || caller === null) return EMPTY
  return jwtProvidersFor(service.policy, route.override, caller, service.agentDecides)
}

/** A verdict object to reuse across calls. */
export function newVerdict (): RequestVerdict {
  return { outcome: 'deny', decision: UNAUTHENTICATED_DECISION, dropUnderscoreHeaders: false }
}

/**
 * Decides one request and writes the verdict into `out` (returned). Order: exemption, path
 * normalization (400), header names (400), identity (401), then the route override and the service's
 * intentions on the canonical path, where every other spelling the router treats alike can only
 * add a denial, and the path the router dispatched on must be allowed in its own right. A header
 * they read ambiguously (repeated, or HTTP/2 host vs :authority) makes it 400 whatever they decided.
 */
export function decideRequest (service: ServiceRules, route: RouteRules, request: RequestView, out: RequestVerdict,
  trace: DecisionTrace | null = null): RequestVerdict {
  out.dropUnderscoreHeaders = false
  if (route.exempt) return settle(out, 'exempt', EXEMPT_DECISION)
  // The request normalization comes first, for every caller: a spelling the mesh refuses is never
  // served, not even by shadow enforcement to a caller without a certificate (docs/semantics.md#rollout-shadow).
  const url = request.url
  const normalization = service.normalization
  const path = canonicalPath(url, normalization)
  if (path === null) return settle(out, 'bad-path', BAD_PATH_DECISION)
  // A fragment is never sent: Envoy refuses a target with one (400), while Fastify's router would
  // hand everything after the '#' to the query parser, where no `:path` matcher saw it. The path
  // ends at a '?' or '#': a target that is its own canonical path has neither, and is not scanned.
  if (url !== path && url.indexOf('#') !== -1) return settle(out, 'bad-path', FRAGMENT_DECISION)
  let rawHeaders = request.rawHeaders
  // An absolute-form target carries its own authority, which Envoy puts in place of Host before
  // RBAC, while the application reads Host: unless the two agree, 400 (docs/semantics.md#transport-headers).
  if (url.charCodeAt(0) !== 47 && !targetAuthorityIsHost(url, rawHeaders)) return settle(out, 'bad-header', TARGET_AUTHORITY_DECISION)
  const underscores = normalization?.HeadersWithUnderscoresAction
  if ((underscores === 'REJECT_REQUEST' || underscores === 'DROP_HEADER') && hasUnderscoreName(rawHeaders)) {
    // Envoy acts on these before RBAC; so does the plugin, and the handler sees the same request.
    if (underscores === 'REJECT_REQUEST') return settle(out, 'bad-header', BAD_HEADER_DECISION)
    rawHeaders = withoutUnderscoreNames(rawHeaders)
    out.dropUnderscoreHeaders = true
  }
  const caller = request.caller
  if (caller === null) return settle(out, 'unauthenticated', UNAUTHENTICATED_DECISION)

  // A ':path' header matcher sees the normalized path with the query, as Envoy's RBAC does.
  const urlIsPath = isPathOf(url, path)
  // A new object, not a reused one: storing this request's strings into a long-lived object
  // costs a write barrier each, more than the young allocation.
  const facts: MutableFacts = { method: request.method, path, url: urlIsPath ? url : path + queryOf(url), rawHeaders, jwt: request.jwt ?? null }
  headerAmbiguity.reason = null
  // Fastify's rewriteUrl: the mesh decides the target as sent (as Envoy sees it); what the router
  // dispatched on instead is one more spelling, which can only add a denial (docs/semantics.md#paths-rewrite).
  const routedUrl = request.routedUrl
  let rewritten: readonly string[] | null = null
  if (routedUrl !== undefined && routedUrl !== null && routedUrl !== url) {
    const routedPath = routedUrl.indexOf('#') === -1 ? canonicalPath(routedUrl, normalization) : null
    if (routedPath === null) return settle(out, 'bad-path', BAD_PATH_DECISION)
    rewritten = [routedPath, ...routerPaths(routedPath, route.router ?? service.router, routedUrl)]
  }
  let decision = service.agentDecides && route.override === null
    ? null
    : decideLocally(service, route, caller, facts, url, urlIsPath, request.callerRules ?? null, trace, rewritten)
  // Mode 'agent': the agent decides what no override did, unless the caller's intention requires a
  // JWT, which its authorize endpoint ignores: that denies (docs/semantics.md#agent-mode).
  if (decision === null && jwtProvidersFor(service.policy, null, caller).length > 0) decision = AGENT_JWT_DECISION
  // A header the decision read (a rule's, or a token's) is one the application may read otherwise
  // (docs/semantics.md#transport-headers, docs/semantics.md#jwt-locations).
  const ambiguity = headerAmbiguity.reason ?? facts.jwt?.ambiguity ?? null
  if (ambiguity !== null) return settle(out, 'bad-header', Object.freeze({ allow: false, reason: ambiguity }))
  if (decision === null) return settle(out, 'ask-agent', ASK_AGENT_DECISION)
  return settle(out, decision.allow ? 'allow' : 'deny', decision)
}

/**
 * The canonical path decides, and every other spelling the router treats alike (per its options)
 * can only add a denial. The router dispatched on the path as sent, though: when that differs
 * structurally (dot segments, backslashes), it must be allowed in its own right. In mode `'agent'`
 * only the route override decides here, by the same rules; null: no override source matched.
 */
function decideLocally (service: ServiceRules, route: RouteRules, caller: CallerIdentity, req: MutableFacts, url: string,
  urlIsPath: boolean, callerRules: RuleMemo | null, trace: DecisionTrace | null, rewritten: readonly string[] | null): Decision | null {
  const router = route.router ?? service.router
  const path = req.path
  const agent = service.agentDecides
  const plainTarget = isPlainTarget(path, urlIsPath)
  const spellings = routerPaths(path, router, url, urlIsPath, plainTarget)
  const alternatePaths = rewritten === null ? spellings : [...spellings, ...rewritten]
  let decision = agent
    ? decideOverrideSpellings(route.override as CompiledOverride, caller, req, alternatePaths, service.policy, trace)
    : decideSpellings(service.policy, route.override, caller, req, alternatePaths, trace, callerRules)
  if (decision !== null && decision.allow) {
    const routed = routedIfOther(url, path, plainTarget)
    if (routed !== null) {
      req.path = routed
      const alternates = routerPaths(routed, router)
      decision = agent
        ? decideOverrideSpellings(route.override as CompiledOverride, caller, req, alternates, service.policy, trace)
        : decideSpellings(service.policy, route.override, caller, req, alternates, trace, callerRules)
    }
  }
  return decision
}

function settle (out: RequestVerdict, outcome: RequestOutcome, decision: Decision): RequestVerdict {
  out.outcome = outcome
  out.decision = decision
  return out
}

/** `url` is `path`, possibly followed by a query (a target with a fragment was refused before). */
function isPathOf (url: string, path: string): boolean {
  if (url.length === path.length) return url === path
  return url.charCodeAt(path.length) === 63 && url.startsWith(path)
}

/**
 * Whether an absolute-form target's authority (without userinfo) is the request's host header
 * (HTTP/2: `:authority` when there is no `host`), ignoring ASCII case. Only for a target that
 * path normalization accepted and that does not start with '/': an http(s) absolute form.
 */
function targetAuthorityIsHost (url: string, rawHeaders: readonly string[]): boolean {
  const host = headerValue(rawHeaders, 'host') ?? headerValue(rawHeaders, ':authority')
  return host !== undefined && asciiLower(host) === asciiLower(targetAuthority(url))
}

function hasUnderscoreName (rawHeaders: readonly string[]): boolean {
  for (let i = 0; i < rawHeaders.length; i += 2) if ((rawHeaders[i] as string).includes('_')) return true
  return false
}

function withoutUnderscoreNames (rawHeaders: readonly string[]): string[] {
  const kept: string[] = []
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i] as string
    if (!name.includes('_')) kept.push(name, rawHeaders[i + 1] as string)
  }
  return kept
}
