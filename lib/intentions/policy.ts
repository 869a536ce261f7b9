// The intention decision engine: compile the destination's intention list once, then decide each
// request. Pure: data in, decision out; no I/O, no clock, no Fastify types.
// Rules: docs/semantics.md#decision-rules and docs/semantics.md#request-rules.
import type { Intention, IntentionJWTRequirement, IntentionPermission } from '../agent/wire'
import { InvalidIntentionsError } from '../errors'
import { compileJwtRequirement, jwtSatisfied, providerNames } from './jwt'
import type { JwtRequirement, JwtTokens } from './jwt'
import { DEFAULT_MAX_REGEX_PROGRAM_SIZE, type HeaderMatcher, MATCHED, MISMATCH_HEADER, MISMATCH_METHOD, PermissionMatcher, RegexCache, RuleError, asciiLower, compileHttp, isObject, pathRuleNote } from './matchers'
import { queryOf } from './path'

export { RuleError } from './matchers'

/** A verified caller (trust domain already checked). '' partition or namespace means 'default'. */
export interface CallerIdentity { readonly partition: string, readonly namespace: string, readonly service: string }

export interface RequestFacts {
  /** As on the wire: methods are compared case-sensitively (docs/semantics.md#methods). */
  readonly method: string
  /** Canonical path (see canonicalPath), without query string. */
  readonly path: string
  /** Raw request target, for a ':path' header matcher. */
  readonly url: string
  /** Node's req.rawHeaders: [name, value, name, value, ...]. */
  readonly rawHeaders: readonly string[]
  /**
   * The request's verified tokens, for JWT requirements (docs/semantics.md#jwt); null or absent:
   * none were looked at, and every requirement fails.
   */
  readonly jwt?: JwtTokens | null
}

export interface Decision { readonly allow: boolean, readonly reason: string }

/** Why a permission did not match: its first failing condition, or (its HTTP part matched) its JWT requirement. */
export type PermissionMismatch = 'method' | 'path' | 'header' | 'jwt'

/**
 * Receives the steps of one decision from the code that makes it (docs/semantics.md#rollout-explain):
 * `explain` passes one, the request path passes null and pays nothing for it.
 */
export interface DecisionTrace {
  /**
   * A source rule looked at, in precedence order, up to the first whose source matches the
   * caller (reported with `matched` true); `scope` says whether it is a route override.
   */
  source (scope: 'route' | 'service', rule: string, matched: boolean): void
  /**
   * A permission of the matched rule checked against `path` (the canonical path or another
   * spelling of it): `failed` is null when it matched, and `header` names the failing header.
   */
  permission (rule: string, index: number, action: 'allow' | 'deny', path: string, failed: PermissionMismatch | null, header: string | null): void
}

export interface PolicyInput {
  /** This service's name; 'ns/name' or 'partition/ns/name' also restrict the destination namespace/partition. */
  destination: string
  /** The /v1/connect/intentions/match list for the destination, in any order. */
  intentions: readonly Intention[]
  defaultAllow: boolean
  /** The service protocol: only 'http', 'http2' and 'grpc' evaluate L7 permissions (docs/semantics.md#protocol). */
  protocol: string
  /** The largest RE2 program accepted (docs/semantics.md#paths-regex-size); default 1,048,576, as Consul sets it for Envoy. */
  maxRegexProgramSize?: number
}

/** A route-level source rule: like a `service-intentions` source, evaluated before the service's policy. */
export interface RouteSource {
  name: string
  namespace?: string
  partition?: string
  action?: 'allow' | 'deny'
  permissions?: IntentionPermission[]
  /** A top-level JWT requirement for this source, in Consul's form (`{ Providers: [...] }`). */
  jwt?: IntentionJWTRequirement
}

const HTTP_LIKE = new Set(['http', 'http2', 'grpc'])

/** Whether L7 rules apply on `protocol` (docs/semantics.md#protocol). */
export function isHttpLike (protocol: string): boolean {
  return HTTP_LIKE.has(protocol.toLowerCase())
}
const PERMISSION_KEYS = new Set(['Action', 'HTTP', 'JWT'])
const SOURCE_KEYS = new Set(['name', 'namespace', 'partition', 'action', 'permissions', 'jwt'])
const NO_PROVIDERS: readonly string[] = Object.freeze([])

function decision (allow: boolean, reason: string): Decision {
  return Object.freeze({ allow, reason })
}

const DEFAULT_ALLOW = decision(true, 'default policy (allow)')
const DEFAULT_DENY = decision(false, 'default policy (deny)')

/** One compiled permission of an L7 rule. */
interface Permission {
  readonly matcher: PermissionMatcher
  /** Met or not, a permission whose HTTP part matched decides: no later permission is tried (docs/semantics.md#jwt-match). */
  readonly jwt: JwtRequirement | null
  /** Its HTTP part matched but its requirement failed: the default policy's verdicts. */
  readonly jwtFailed: JwtFailure | null
  readonly decision: Decision
  /** For a deny: the same denial found on an alternate (router) spelling of the path. */
  readonly altDecision: Decision | null
}

/** One source rule: a compiled intention or route-override source ('default' for an empty partition or namespace). */
interface Rule {
  /** How decisions and traces name it (`intention default/web => default/api (precedence 9)`). */
  readonly label: string
  readonly partition: string
  readonly namespace: string
  readonly name: string
  /** The verdict when it does not depend on the request (L4, or L7 that cannot be evaluated). */
  readonly fixed: Decision | null
  readonly permissions: readonly Permission[]
  /** L7, no permission matched: the default policy, allow or deny. */
  readonly noMatchAllow: Decision
  readonly noMatchDeny: Decision
  /** L7 route override, no permission matched, default unknown (no policy given): fail closed. */
  readonly noMatchAlone: Decision
  /** The top-level JWT requirement, ANDed with the source match (docs/semantics.md#jwt-match). */
  readonly jwt: JwtRequirement | null
  /** The verdicts when the top-level requirement fails: the default policy's, as for no match. */
  readonly jwtFailed: JwtFailure
  /** Every provider this rule's requirements name: the tokens a request needs verified. */
  readonly jwtProviders: readonly string[]
}

interface JwtFailure { readonly allow: Decision, readonly deny: Decision, readonly alone: Decision }

/** A rule whose verdict never depends on the request (L4), unless through a top-level JWT requirement. */
function fixedRule (label: string, partition: string, namespace: string, name: string, fixed: Decision, jwt: JwtRequirement | null): Rule {
  return {
    label,
    partition,
    namespace,
    name,
    fixed,
    permissions: [],
    noMatchAllow: fixed,
    noMatchDeny: fixed,
    noMatchAlone: fixed,
    jwt,
    jwtFailed: jwtFailureOf(label, ': ', jwt),
    jwtProviders: jwtProvidersOf(jwt, [])
  }
}

/** The requirement behind each "JWT requirement not met" decision, for the log line that says which provider failed. */
const FAILED_REQUIREMENTS = new WeakMap<Decision, JwtRequirement>()

/** The JWT requirement whose failure `d` reports, or undefined when `d` is not such a decision. */
export function failedJwtRequirement (d: Decision): JwtRequirement | undefined {
  return FAILED_REQUIREMENTS.get(d)
}

function jwtFailureOf (head: string, sep: string, jwt: JwtRequirement | null): JwtFailure {
  const failure = Object.freeze({
    allow: decision(true, `${head}${sep}JWT requirement not met, default policy (allow)`),
    deny: decision(false, `${head}${sep}JWT requirement not met, default policy (deny)`),
    alone: decision(false, `${head}${sep}JWT requirement not met (deny)`)
  })
  if (jwt !== null) for (const d of [failure.allow, failure.deny, failure.alone]) FAILED_REQUIREMENTS.set(d, jwt)
  return failure
}

function jwtProvidersOf (jwt: JwtRequirement | null, permissions: readonly Permission[]): readonly string[] {
  const names = providerNames([jwt, ...permissions.map((p) => p.jwt)])
  return names.length === 0 ? NO_PROVIDERS : Object.freeze(names)
}

function providersOf (rules: readonly Rule[]): readonly string[] {
  const names = new Set<string>()
  for (const r of rules) for (const n of r.jwtProviders) names.add(n)
  return names.size === 0 ? NO_PROVIDERS : Object.freeze([...names])
}

interface PolicyFields {
  readonly defaultAllow: boolean
  readonly warnings: readonly string[]
  /** In precedence order. */
  readonly rules: readonly Rule[]
  /** partition → namespace pattern → name pattern → position of the first such rule. */
  readonly index: ReadonlyMap<string, ReadonlyMap<string, ReadonlyMap<string, number>>>
}

/**
 * Which rule of a compiled policy matches one caller, kept by whoever holds the caller's verified
 * identity (lib/identity.ts keeps one per identity record), so that its later requests skip the
 * index lookups. The policy is named by its serial number, not held: a replaced policy is freed.
 */
export interface RuleMemo {
  serial: number
  rule: Rule | null
}

/** A new, empty memo. */
export function newRuleMemo (): RuleMemo {
  return { serial: -1, rule: null }
}

let nextSerial = 0

/** The destination's intentions, compiled by compilePolicy(). */
export class CompiledPolicy {
  /** Unique in the process: what a RuleMemo remembers the policy by. */
  readonly serial = nextSerial++
  readonly defaultAllow: boolean
  /** One line per distinct cause, for the caller to log once. */
  readonly warnings: readonly string[]
  /** Intentions kept (after dropping peered, sameness-group and other-destination ones). */
  readonly size: number
  readonly defaultDecision: Decision
  /** Every JWT provider a requirement names (docs/semantics.md#jwt-providers); empty: tokens are never looked at. */
  readonly jwtProviders: readonly string[]
  readonly #rules: readonly Rule[]
  readonly #index: PolicyFields['index']

  constructor (fields: PolicyFields) {
    this.defaultAllow = fields.defaultAllow
    this.warnings = Object.freeze(fields.warnings)
    this.#rules = fields.rules
    this.#index = fields.index
    this.size = fields.rules.length
    this.defaultDecision = fields.defaultAllow ? DEFAULT_ALLOW : DEFAULT_DENY
    this.jwtProviders = providersOf(fields.rules)
  }

  /**
   * The first rule (in precedence order) whose source matches the caller, or null (docs/semantics.md#first-match): a few
   * map lookups, no scan and no allocation; none at all when `memo` (the caller's) already knows
   * it for this policy. A trace always looks up, since it lists the sources passed over.
   */
  ruleFor (caller: CallerIdentity, trace: DecisionTrace | null, memo: RuleMemo | null = null): Rule | null {
    if (memo !== null && trace === null && memo.serial === this.serial) return memo.rule
    let best = Infinity
    const byNamespace = this.#index.get(orDefault(caller.partition))
    if (byNamespace !== undefined) {
      // At most four patterns can match: ns/name, ns/*, */name, */*; the earliest one decides.
      const exactNs = byNamespace.get(orDefault(caller.namespace))
      if (exactNs !== undefined) best = earliest(exactNs, caller.service, best)
      const anyNs = byNamespace.get('*')
      if (anyNs !== undefined) best = earliest(anyNs, caller.service, best)
    }
    // The index found the first match: every rule before it did not match.
    if (trace !== null) traceSources(trace, 'service', this.#rules, best)
    const rule = best === Infinity ? null : this.#rules[best]
    if (memo !== null) {
      memo.serial = this.serial
      memo.rule = rule
    }
    return rule
  }
}

function traceSources (trace: DecisionTrace, scope: 'route' | 'service', rules: readonly Rule[], matched: number): void {
  const end = Math.min(matched, rules.length - 1)
  for (let i = 0; i <= end; i++) trace.source(scope, rules[i].label, i === matched)
}

function earliest (byName: ReadonlyMap<string, number>, service: string, best: number): number {
  const exact = byName.get(service)
  if (exact !== undefined && exact < best) best = exact
  const any = byName.get('*')
  if (any !== undefined && any < best) best = any
  return best
}

/** A route's `sources`, compiled by compileOverride(). */
export class CompiledOverride {
  readonly size: number
  /** One line per path rule compared otherwise than written (docs/semantics.md#paths-non-ascii), for the caller to log. */
  readonly warnings: readonly string[]
  /** Every JWT provider a requirement of the override names. */
  readonly jwtProviders: readonly string[]
  /** In precedence order. */
  readonly #rules: readonly Rule[]

  constructor (rules: readonly Rule[], warnings: readonly string[] = []) {
    this.#rules = rules
    this.size = rules.length
    this.warnings = Object.freeze(warnings)
    this.jwtProviders = providersOf(rules)
  }

  ruleFor (caller: CallerIdentity, trace: DecisionTrace | null): Rule | null {
    const partition = orDefault(caller.partition)
    const namespace = orDefault(caller.namespace)
    const rules = this.#rules
    let found = Infinity
    for (let i = 0; i < rules.length; i++) {
      const r = rules[i]
      if (r.partition === partition && (r.namespace === '*' || r.namespace === namespace) &&
        (r.name === '*' || r.name === caller.service)) { found = i; break }
    }
    if (trace !== null) traceSources(trace, 'route', rules, found)
    return found === Infinity ? null : rules[found]
  }
}

function orDefault (s: string | undefined | null): string {
  return s === undefined || s === null || s === '' ? 'default' : s
}

/** The verdict of a rule whose source matched; `defaultAllow` null: a route override without a policy. */
function evaluate (rule: Rule, req: RequestFacts, defaultAllow: boolean | null, trace: DecisionTrace | null): Decision {
  // A failed requirement: the rule still matched (precedence ignores JWT), so no lower intention
  // is tried and the default policy decides (docs/semantics.md#jwt-match).
  if (rule.jwt !== null && !jwtSatisfied(rule.jwt, req.jwt ?? null)) return jwtFailure(rule.jwtFailed, defaultAllow)
  if (rule.fixed !== null) return rule.fixed
  const i = firstMatch(rule, req, req.path, trace)
  if (i !== -1) {
    const p = rule.permissions[i]
    return p.jwt === null || jwtSatisfied(p.jwt, req.jwt ?? null) ? p.decision : jwtFailure(p.jwtFailed as JwtFailure, defaultAllow)
  }
  // No fall-through to lower intentions: the default policy decides (docs/semantics.md#first-match).
  return defaultAllow === null ? rule.noMatchAlone : defaultAllow ? rule.noMatchAllow : rule.noMatchDeny
}

function jwtFailure (f: JwtFailure, defaultAllow: boolean | null): Decision {
  return defaultAllow === null ? f.alone : defaultAllow ? f.allow : f.deny
}

/** A denial that `path` (an alternate spelling) gets from a deny permission of `rule`, or null. */
function alternateDenial (rule: Rule, req: RequestFacts, path: string, trace: DecisionTrace | null): Decision | null {
  // A ':path' header matcher reads this spelling too, with the request's query (a canonical path
  // holds no '?'); allocated only here, for the spellings other than the canonical one.
  const i = firstMatch(rule, req, path, trace, path + queryOf(req.url))
  if (i === -1) return null
  const p = rule.permissions[i]
  // A deny that needs a token applies only with one (docs/semantics.md#jwt-match).
  return p.jwt === null || jwtSatisfied(p.jwt, req.jwt ?? null) ? p.altDecision : null
}

/** The position of the first permission of `rule` whose HTTP part matches the request on `path`, or -1. */
function firstMatch (rule: Rule, req: RequestFacts, path: string, trace: DecisionTrace | null, url: string = req.url): number {
  const perms = rule.permissions
  for (let i = 0; i < perms.length; i++) {
    const p = perms[i]
    const miss = p.matcher.mismatch(req.method, path, url, req.rawHeaders)
    if (trace !== null) tracePermission(trace, rule, i, path, miss, req)
    if (miss === MATCHED) return i
  }
  return -1
}

function tracePermission (trace: DecisionTrace, rule: Rule, i: number, path: string, miss: number, req: RequestFacts): void {
  const p = rule.permissions[i]
  const jwtFailed = miss === MATCHED && p.jwt !== null && !jwtSatisfied(p.jwt, req.jwt ?? null)
  const failed = jwtFailed ? 'jwt' : miss === MATCHED ? null : miss === MISMATCH_METHOD ? 'method' : miss < MISMATCH_HEADER ? 'path' : 'header'
  const header = failed === 'header' ? (p.matcher.headers as readonly HeaderMatcher[])[miss - MISMATCH_HEADER].name : null
  trace.permission(rule.label, i + 1, p.decision.allow ? 'allow' : 'deny', path, failed, header)
}

/** Decide one request of a verified caller against the service's policy (docs/semantics.md#first-match). */
export function decide (policy: CompiledPolicy, caller: CallerIdentity, req: RequestFacts): Decision {
  const rule = policy.ruleFor(caller, null)
  return rule === null ? policy.defaultDecision : evaluate(rule, req, policy.defaultAllow, null)
}

/**
 * Decide against a route's override: null when no override source matches the caller (the
 * service's policy then decides). When a matching L7 source has no matching permission the
 * default policy decides, as for intentions; pass `policy` to supply it, otherwise that case denies.
 */
export function decideOverride (override: CompiledOverride, caller: CallerIdentity, req: RequestFacts,
  policy?: CompiledPolicy, trace: DecisionTrace | null = null): Decision | null {
  const rule = override.ruleFor(caller, trace)
  if (rule === null) return null
  return evaluate(rule, req, policy === undefined ? null : policy.defaultAllow, trace)
}

/**
 * One path, decided: the route override (if any) first, then the service's policy, then the
 * alternate spellings of the path (routerPaths). An alternate can only turn an allow
 * into a deny, and only through a deny permission of the same rule: a default verdict on an
 * alternate spelling does not count, or an allow-list would deny its own paths ('/items' allowed,
 * '/items/' not listed).
 */
export function decideSpellings (policy: CompiledPolicy, override: CompiledOverride | null, caller: CallerIdentity,
  req: RequestFacts, alternatePaths: readonly string[], trace: DecisionTrace | null = null, callerRules: RuleMemo | null = null): Decision {
  let rule = override === null ? null : override.ruleFor(caller, trace)
  if (rule === null) rule = policy.ruleFor(caller, trace, callerRules)
  if (rule === null) return policy.defaultDecision
  return decideRule(rule, req, alternatePaths, policy, trace)
}

/** The deciding rule's verdict, denied when any other spelling of the path would be denied. */
function decideRule (rule: Rule, req: RequestFacts, alternatePaths: readonly string[], policy: CompiledPolicy,
  trace: DecisionTrace | null): Decision {
  const d = evaluate(rule, req, policy.defaultAllow, trace)
  // An allow by the default policy after a failed top-level requirement: the rule does not apply.
  if (!d.allow || rule.fixed !== null || d === rule.jwtFailed.allow) return d
  for (let i = 0; i < alternatePaths.length; i++) {
    const denial = alternateDenial(rule, req, alternatePaths[i], trace)
    if (denial !== null) return denial
  }
  return d
}

/**
 * `decideSpellings` for a route override alone (mode `'agent'`, docs/semantics.md#paths-agent-mode): the
 * same spelling rules, and null when no override source matches the caller (the agent then decides).
 */
export function decideOverrideSpellings (override: CompiledOverride, caller: CallerIdentity, req: RequestFacts,
  alternatePaths: readonly string[], policy: CompiledPolicy, trace: DecisionTrace | null = null): Decision | null {
  const rule = override.ruleFor(caller, trace)
  if (rule === null) return null
  return decideRule(rule, req, alternatePaths, policy, trace)
}

/**
 * The JWT providers whose tokens the rule deciding for `caller` may look at (the route override's
 * first, as decideSpellings picks it); empty when no requirement applies, so a request to a rule
 * without JWT never has a token verified. `overrideOnly`: mode 'agent', where only overrides decide here.
 */
export function jwtProvidersFor (policy: CompiledPolicy, override: CompiledOverride | null, caller: CallerIdentity,
  overrideOnly = false): readonly string[] {
  if (policy.jwtProviders.length === 0 && (override === null || override.jwtProviders.length === 0)) return NO_PROVIDERS
  let rule = override === null ? null : override.ruleFor(caller, null)
  if (rule === null && !overrideOnly) rule = policy.ruleFor(caller, null)
  return rule === null ? NO_PROVIDERS : rule.jwtProviders
}

// ---------------------------------------------------------------------------------------------
// Compilation

/** Byte-wise (UTF-8) string order, as Go compares strings in Consul's sorter. */
export function compareBytes (a: string, b: string): number {
  const n = Math.min(a.length, b.length)
  for (let i = 0; i < n; i++) {
    let x = a.charCodeAt(i)
    let y = b.charCodeAt(i)
    if (x === y) continue
    // UTF-16 order differs from code point order only for surrogates versus U+E000..U+FFFF.
    if (x >= 0xd800) x = x >= 0xe000 ? x - 0x800 : x + 0x2000
    if (y >= 0xd800) y = y >= 0xe000 ? y - 0x800 : y + 0x2000
    return x - y
  }
  return a.length - b.length
}

const TIE_BREAK_FIELDS = ['SourceSamenessGroup', 'SourcePeer', 'SourcePartition', 'SourceNS', 'SourceName',
  'DestinationPartition', 'DestinationNS', 'DestinationName'] as const

/** Consul's IntentionPrecedenceSorter (docs/semantics.md#precedence): Precedence descending, then the fields ascending. */
export function comparePrecedence (a: Intention, b: Intention): number {
  if (a.Precedence !== b.Precedence) return b.Precedence - a.Precedence
  for (const f of TIE_BREAK_FIELDS) {
    const c = compareBytes(a[f] ?? '', b[f] ?? '')
    if (c !== 0) return c
  }
  return 0
}

function label (partition: string | undefined, namespace: string | undefined, name: string): string {
  const p = orDefault(partition)
  return `${p === 'default' ? '' : p + '/'}${orDefault(namespace)}/${name}`
}

function compilePermissions (perms: readonly unknown[], where: string, strict: boolean, head: string,
  cache: RegexCache): Permission[] {
  const out: Permission[] = []
  for (let i = 0; i < perms.length; i++) {
    const w = `${where}[${i}]`
    const perm = perms[i]
    if (!isObject(perm)) throw new RuleError(`${w} must be an object`)
    for (const k of Object.keys(perm)) {
      if (!PERMISSION_KEYS.has(k)) throw new RuleError(`${w}.${k} is not a known field (Action, HTTP, JWT)`)
    }
    const action = perm.Action
    if (action !== 'allow' && action !== 'deny') throw new RuleError(`${w}.Action must be "allow" or "deny"`)
    const jwt = compileJwtRequirement(perm.JWT, `${w}.JWT`, strict)
    const matcher = compileHttp(perm.HTTP, `${w}.HTTP`, strict, cache, action === 'deny')
    const allow = action === 'allow'
    const reason = `${head}, permission ${i + 1} (${action})`
    out.push({
      matcher,
      jwt,
      jwtFailed: jwt === null ? null : jwtFailureOf(`${head}, permission ${i + 1}`, ': ', jwt),
      decision: decision(allow, reason),
      altDecision: allow ? null : decision(false, `${reason} for another spelling of the path that reaches the same route`)
    })
  }
  return out
}

function l7Rule (partition: string, namespace: string, name: string, fixed: Decision | null,
  permissions: Permission[], head: string, sep: string, jwt: JwtRequirement | null): Rule {
  return {
    label: head,
    partition,
    namespace,
    name,
    fixed,
    permissions,
    noMatchAllow: decision(true, `${head}${sep}no permission matched, default policy (allow)`),
    noMatchDeny: decision(false, `${head}${sep}no permission matched, default policy (deny)`),
    noMatchAlone: decision(false, `${head}${sep}no permission matched (deny)`),
    jwt,
    jwtFailed: jwtFailureOf(head, sep, jwt),
    jwtProviders: fixed === null ? jwtProvidersOf(jwt, permissions) : NO_PROVIDERS
  }
}

interface Counts { peer: number, sameness: number, jwtOnTcp: number, destination: number, l7OnTcp: number, pathNotes: string[] }

function compileIntention (ixn: Intention, http: boolean, protocol: string, counts: Counts, cache: RegexCache): Rule {
  const src = label(ixn.SourcePartition, ixn.SourceNS, ixn.SourceName)
  const dst = label(ixn.DestinationPartition, ixn.DestinationNS, ixn.DestinationName)
  const head = `intention ${src} => ${dst} (precedence ${ixn.Precedence})`
  const description = `${src} => ${dst} (Precedence ${ixn.Precedence})`
  const partition = orDefault(ixn.SourcePartition)
  const namespace = orDefault(ixn.SourceNS)
  try {
    const jwt = compileJwtRequirement(ixn.JWT, 'JWT', false)
    const perms = ixn.Permissions
    // Consul's Envoy config looks at Permissions first: a non-empty list makes the intention L7.
    // Otherwise Action is set (lib/agent/parse.ts refuses an intention with neither).
    if (perms === undefined || perms.length === 0) {
      const action = ixn.Action
      if (jwt !== null && !http) {
        // Like an L7 rule, a token cannot be looked at without HTTP: fail closed (docs/semantics.md#jwt-protocol).
        counts.jwtOnTcp++
        return fixedRule(head, partition, namespace, ixn.SourceName,
          decision(false, `${head} requires a JWT but protocol ${JSON.stringify(protocol)} is not HTTP-like (deny)`), null)
      }
      return fixedRule(head, partition, namespace, ixn.SourceName, decision(action === 'allow', `${head} ${String(action)}`), jwt)
    }
    // Compiled even when unused (non-HTTP protocol) so a bad regex is reported either way.
    const permissions = compilePermissions(perms, 'Permissions', false, head, cache)
    let fixed: Decision | null = null
    if (!http) {
      counts.l7OnTcp++
      fixed = decision(false, `${head} has L7 permissions but protocol ${JSON.stringify(protocol)} is not HTTP-like (deny)`)
    }
    notePathRules(permissions, `intention ${description}`, counts.pathNotes)
    return l7Rule(partition, namespace, ixn.SourceName, fixed, permissions, head, ': ', fixed === null ? jwt : null)
  } catch (err) {
    throw new InvalidIntentionsError(description, (err as Error).message)
  }
}

/**
 * The destination's name, namespace and partition, ASCII lower-cased: Consul stores and looks up
 * config entries without regard to ASCII case, so its answer for service `Api` holds the entry it
 * keeps as `api` (forDestination compares them so).
 */
function parseDestination (destination: string): { partition: string | null, namespace: string | null, name: string } {
  const parts = asciiLower(destination).split('/')
  if (parts.length > 3 || parts.some((p) => p === '')) {
    throw new TypeError(`destination ${JSON.stringify(destination)} must be "name", "namespace/name" or "partition/namespace/name"`)
  }
  const name = parts[parts.length - 1]
  return {
    name,
    namespace: parts.length >= 2 ? parts[parts.length - 2] : null,
    partition: parts.length === 3 ? parts[0] : null
  }
}

/**
 * Compile the destination's intentions. Throws InvalidIntentionsError naming the offending
 * intention when one cannot be enforced (a regex RE2 rejects, an unknown action or field); the
 * caller then keeps its last good policy (docs/semantics.md#re2).
 */
export function compilePolicy (input: PolicyInput): CompiledPolicy {
  const dest = parseDestination(input.destination)
  const protocol = input.protocol
  const http = isHttpLike(protocol)

  const counts: Counts = { peer: 0, sameness: 0, jwtOnTcp: 0, destination: 0, l7OnTcp: 0, pathNotes: [] }
  const kept: Intention[] = []
  for (const ixn of input.intentions) {
    // Peers and sameness groups never match a local identity (docs/semantics.md#peers).
    if (ixn.SourcePeer !== undefined && ixn.SourcePeer !== null && ixn.SourcePeer !== '') counts.peer++
    else if (ixn.SourceSamenessGroup !== undefined && ixn.SourceSamenessGroup !== null && ixn.SourceSamenessGroup !== '') counts.sameness++
    else if (!forDestination(ixn, dest)) counts.destination++
    else kept.push(ixn)
  }
  // Re-sort: the transport order is not trusted (docs/semantics.md#precedence).
  kept.sort(comparePrecedence)

  const rules: Rule[] = []
  const index = new Map<string, Map<string, Map<string, number>>>()
  const cache = new RegexCache(regexLimit(input.maxRegexProgramSize))
  for (const ixn of kept) {
    const rule = compileIntention(ixn, http, protocol, counts, cache)
    const position = rules.length
    rules.push(rule)
    let byNamespace = index.get(rule.partition)
    if (byNamespace === undefined) index.set(rule.partition, byNamespace = new Map())
    let byName = byNamespace.get(rule.namespace)
    if (byName === undefined) byNamespace.set(rule.namespace, byName = new Map())
    // A later rule with the same source pattern can never be the first match.
    if (!byName.has(rule.name)) byName.set(rule.name, position)
  }
  return new CompiledPolicy({ defaultAllow: input.defaultAllow, warnings: [...warningsFor(counts, protocol), ...cache.costly], rules, index })
}

/** Whether an intention the agent matched is for this (lower-cased) destination, without regard to ASCII case. */
function forDestination (ixn: Intention, dest: ReturnType<typeof parseDestination>): boolean {
  if (ixn.DestinationName !== '*' && asciiLower(ixn.DestinationName) !== dest.name) return false
  if (dest.namespace !== null && ixn.DestinationNS !== '*' && asciiLower(orDefault(ixn.DestinationNS)) !== dest.namespace) return false
  return dest.partition === null || asciiLower(orDefault(ixn.DestinationPartition)) === dest.partition
}

function warningsFor (c: Counts, protocol: string): string[] {
  const w: string[] = []
  if (c.peer > 0) w.push(`${c.peer} intention(s) with a peered source (SourcePeer) ignored: cluster peering is not supported, they never match`)
  if (c.sameness > 0) w.push(`${c.sameness} intention(s) with a sameness-group source ignored: sameness groups are not supported, they never match`)
  if (c.destination > 0) w.push(`${c.destination} intention(s) for another destination ignored`)
  if (c.jwtOnTcp > 0) {
    w.push(`${c.jwtOnTcp} intention(s) require a JWT but the service protocol ${JSON.stringify(protocol)} is not ` +
      'HTTP-like: they deny every request from their sources')
  }
  if (c.l7OnTcp > 0) {
    w.push(`${c.l7OnTcp} intention(s) have L7 permissions but the service protocol ${JSON.stringify(protocol)} is not ` +
      'HTTP-like: they deny every request from their sources')
  }
  w.push(...c.pathNotes)
  return w
}

// ---------------------------------------------------------------------------------------------
// Route overrides

function checkName (v: unknown, where: string, required: boolean, wildcard: boolean): string | undefined {
  if (v === undefined && !required) return undefined
  if (typeof v !== 'string' || v === '') throw new RuleError(`${where} must be a non-empty string`)
  if (v.includes('*') && (v !== '*' || !wildcard)) {
    throw new RuleError(wildcard ? `${where} must be "*" or contain no "*"` : `${where} cannot contain "*"`)
  }
  return v
}

/**
 * Checks a `Permissions` list as Consul does when the entry holding it is written (what data from
 * the agent, validated already, is spared): `HTTP` required and not empty, paths starting with
 * '/', known methods once each. Throws a RuleError saying what is wrong.
 */
export function checkPermissionsAsWritten (permissions: readonly unknown[], where: string, maxRegexProgramSize?: number): void {
  compilePermissions(permissions, where, true, where, new RegexCache(regexLimit(maxRegexProgramSize)))
}

/**
 * Compile a route's `sources` (a non-empty list, lib/route-policy.ts checks), each validated as
 * Consul validates a `service-intentions` entry source. Throws a TypeError (RuleError) whose
 * message says exactly what is wrong.
 */
export function compileOverride (sources: readonly RouteSource[], maxRegexProgramSize?: number): CompiledOverride {
  const seen = new Map<string, number>()
  const cache = new RegexCache(regexLimit(maxRegexProgramSize))
  const notes: string[] = []
  const compiled: Array<{ rule: Rule, precedence: number }> = []
  sources.forEach((s: unknown, i) => {
    const where = `sources[${i}]`
    if (!isObject(s)) throw new RuleError(`${where} must be an object`)
    for (const k of Object.keys(s)) {
      if (!SOURCE_KEYS.has(k)) throw new RuleError(`${where}.${k} is not a known field (${[...SOURCE_KEYS].join(', ')})`)
    }
    const name = checkName(s.name, `${where}.name`, true, true) as string
    const namespace = checkName(s.namespace, `${where}.namespace`, false, true)
    const partition = checkName(s.partition, `${where}.partition`, false, false)
    if (namespace === '*' && name !== '*') throw new RuleError(`${where}: an exact name cannot follow a wildcard namespace`)
    const action = s.action
    if (action !== undefined && action !== 'allow' && action !== 'deny') throw new RuleError(`${where}.action must be "allow" or "deny"`)
    const perms = s.permissions
    if (perms !== undefined && !Array.isArray(perms)) throw new RuleError(`${where}.permissions must be an array`)
    const jwt = compileJwtRequirement(s.jwt, `${where}.jwt`, true)
    // As in Consul, an empty permissions list counts as absent.
    const l7 = perms !== undefined && perms.length > 0
    if (l7 && action !== undefined) throw new RuleError(`${where} must set either action or permissions, not both`)
    if (!l7 && action === undefined) throw new RuleError(`${where} must set action or permissions`)

    const key = `${orDefault(partition)}/${orDefault(namespace)}/${name}`
    const first = seen.get(key)
    if (first !== undefined) throw new RuleError(`${where} repeats source ${key} (already sources[${first}])`)
    seen.set(key, i)

    const head = `route override ${where} ${partition === undefined && namespace === undefined ? name : label(partition, namespace, name)}`
    let rule: Rule
    if (l7) {
      const permissions = compilePermissions(perms, `${where}.permissions`, true, head, cache)
      notePathRules(permissions, where, notes)
      rule = l7Rule(orDefault(partition), orDefault(namespace), name, null, permissions, head, ': ', jwt)
    } else {
      rule = fixedRule(head, orDefault(partition), orDefault(namespace), name, decision(action === 'allow', `${head} ${action as string}`), jwt)
    }
    // The same precedence numbers as intentions to an exact destination (docs/semantics.md#precedence-numbers): 9, 8, 7.
    compiled.push({ rule, precedence: namespace === '*' ? 7 : name === '*' ? 8 : 9 })
  })
  compiled.sort((a, b) => b.precedence - a.precedence ||
    compareBytes(a.rule.partition, b.rule.partition) || compareBytes(a.rule.namespace, b.rule.namespace) ||
    compareBytes(a.rule.name, b.rule.name))
  return new CompiledOverride(compiled.map((c) => c.rule), [...notes, ...cache.costly])
}

function regexLimit (max: number | undefined): number {
  if (max === undefined) return DEFAULT_MAX_REGEX_PROGRAM_SIZE
  if (!Number.isSafeInteger(max) || max < 1) throw new TypeError('maxRegexProgramSize must be a positive integer')
  return max
}

/** Notes path rules compared otherwise than written (docs/semantics.md#paths-non-ascii). */
function notePathRules (permissions: readonly Permission[], where: string, notes: string[]): void {
  for (let i = 0; i < permissions.length; i++) {
    const note = pathRuleNote(permissions[i].matcher)
    if (note !== null) notes.push(`${where}, permission ${i + 1}: ${note}`)
  }
}
