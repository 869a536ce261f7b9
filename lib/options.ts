// Plugin options, validated and defaulted once at registration. Every mistake fails `register()`
// with FST_CONSUL_NATIVE_INVALID_OPTION naming the option and what to fix.
import type { AgentOptions } from './agent/config'
import { resolveCertificatesOption } from './certificates/options'
import type { CertificatesOptions } from './certificates/options'
import { InvalidOptionError } from './errors'
import { DEFAULT_MAX_REGEX_PROGRAM_SIZE } from './intentions/matchers'
import { DEFAULT_LOG_LIMIT } from './log-limiter'
import type { LogLimit } from './log-limiter'
import type { IntentionJWTRequirement, IntentionPermission } from './agent/wire'
import type { RouteSource } from './intentions/policy'
import { validateRegisterOption } from './registration'
import type { RegisterOptions } from './registration'

export interface HealthRouteOptions {
  /** Path of the exempt health route. Default `/health`. */
  url?: string
}

export interface ConsulNativeOptions {
  /** The Consul service name this app runs as. Required. */
  service: string
  /** How to reach the local agent; defaults come from the CONSUL_HTTP_* variables. */
  agent?: AgentOptions
  /** Datacenter to request certificates and intentions for. Default: the agent's. */
  datacenter?: string
  /** Consul Enterprise namespace; sent only when set (a CE agent rejects it, even as `default`). Also outbound targets' default. */
  namespace?: string
  /** Consul Enterprise admin partition; sent only when set. Also outbound targets' default. */
  partition?: string
  /** How long `register()` waits for the first leaf, roots and intentions (ms). Default 8000; must stay below Fastify's pluginTimeout. */
  readyTimeout?: number
  /** Decision when no intention matches: `'agent'` (default) asks the agent, else fixed. */
  defaultPolicy?: 'allow' | 'deny' | 'agent'
  /** Exempt health route; `false` disables it. Default `{ url: '/health' }`. */
  health?: HealthRouteOptions | false
  /** `'l7'` (default) decides per request from cached intentions; `'agent'` asks the agent's authorize endpoint per connection (L4). */
  mode?: 'l7' | 'agent'
  /** Blocking-query wait sent to the agent (ms). Default 300000, at most 600000. */
  blockingWait?: number
  /** Register this instance with the local agent on listen (Connect native), deregister on close. Default false. */
  register?: boolean | RegisterOptions
  /** Where the leaf and CA roots come from. Default `{ source: 'agent' }`. */
  certificates?: CertificatesOptions
  /** Decide open WebSockets (upgraded connections) again when intentions or certificates change, and close those now refused. Default false. */
  recheckUpgrades?: boolean
  /**
   * `'enforce'` (default) answers 401/403; `'shadow'` decides every request the same way but
   * serves the would-be denials, logging and counting them. A route's `enforcement` wins.
   */
  enforcement?: Enforcement
  /**
   * A `service-intentions` config entry in Consul's JSON form (what `consul config write` takes),
   * inline or as a path to a file re-read when it changes: every request is also decided against
   * it, and disagreements with the live intentions are counted and logged. Never changes a response.
   */
  candidate?: string | Record<string, unknown>
  /**
   * The largest RE2 program a `PathRegex` or header `Regex` may compile to (re2js `programSize()`);
   * a larger one rejects the intention update, or the route. Default 1 048 576, the bound Consul
   * sets for its Envoy proxies; lower it to keep costly patterns out.
   */
  maxRegexProgramSize?: number
  /**
   * Volume of denied, unauthenticated and rejected request lines. The first of each caller and
   * route is always logged; repeats: one in `sample`, at most `perSecond` per second. Counters
   * stay exact. Default `{ sample: 1, perSecond: 10 }`.
   */
  logDenials?: { sample?: number, perSecond?: number }
}

/** How denials are applied: answered (`'enforce'`) or only recorded (`'shadow'`). */
export type Enforcement = 'enforce' | 'shadow'

/** Per-route setting: `false` exempts the route; an object adds route-level intentions. */
/** An L7 permission as written in JavaScript; Consul's JSON form (`Action`, `HTTP`, …) is accepted too. */
/** A JWT requirement written in JavaScript style; Consul's `{ Providers: [...] }` is accepted too. */
export interface RouteJwtRequirement {
  providers: Array<{ name: string, verifyClaims?: Array<{ path: string[], value: string }> }>
}

export interface RoutePermission {
  action: 'allow' | 'deny'
  /** ANDed with this permission (docs/semantics.md#jwt-match). */
  jwt?: RouteJwtRequirement | IntentionJWTRequirement
  http: {
    pathExact?: string
    pathPrefix?: string
    pathRegex?: string
    methods?: string[]
    header?: Array<{ name: string, present?: boolean, exact?: string, prefix?: string, suffix?: string, contains?: string, regex?: string, invert?: boolean, ignoreCase?: boolean }>
  }
}

/** A route-level source: `action` (L4) or `permissions` (L7), as in a service-intentions entry. */
export type RouteSourceInput = Omit<RouteSource, 'permissions' | 'jwt'> & {
  permissions?: Array<RoutePermission | IntentionPermission>
  /** ANDed with the source match, as a `service-intentions` entry's top-level `JWT` (docs/semantics.md#jwt-match). */
  jwt?: RouteJwtRequirement | IntentionJWTRequirement
}

/** `sources`: route-level intentions, evaluated before the service's; `enforcement`: this route's, winning over the plugin's option. */
export type RouteConsulNativeConfig =
  | { sources: RouteSourceInput[], enforcement?: Enforcement }
  | { sources?: RouteSourceInput[], enforcement: Enforcement }

export interface ResolvedOptions {
  readonly service: string
  readonly agent: AgentOptions | undefined
  readonly datacenter: string | undefined
  readonly namespace: string | undefined
  readonly partition: string | undefined
  readonly readyTimeout: number
  readonly defaultPolicy: 'allow' | 'deny' | 'agent'
  readonly health: { readonly url: string } | null
  readonly mode: 'l7' | 'agent'
  readonly blockingWait: number
  readonly register: RegisterOptions | null
  readonly certificates: CertificatesOptions
  readonly recheckUpgrades: boolean
  readonly enforcement: Enforcement
  /** An inline entry, or a file path; null without a candidate. */
  readonly candidate: string | Record<string, unknown> | null
  readonly maxRegexProgramSize: number
  readonly logDenials: LogLimit
}

export const DEFAULT_READY_TIMEOUT = 8_000
export const DEFAULT_BLOCKING_WAIT = 300_000
export const MAX_BLOCKING_WAIT = 600_000
export const DEFAULT_HEALTH_URL = '/health'

/** Every top-level option (the README's options table is checked against it). */
export const OPTION_NAMES: ReadonlySet<string> = new Set(['service', 'agent', 'datacenter', 'namespace', 'partition', 'readyTimeout', 'defaultPolicy', 'health', 'mode', 'blockingWait', 'register', 'certificates', 'recheckUpgrades', 'enforcement', 'candidate', 'maxRegexProgramSize', 'logDenials'])
// Consul service names are DNS-friendly; this also keeps them safe inside a URL path segment.
const SERVICE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/

export function resolveOptions (raw: unknown): ResolvedOptions {
  if (raw === null || typeof raw !== 'object') fail('options', 'must be an object with at least { service }')
  const opts = raw as Record<string, unknown>
  for (const key of Object.keys(opts)) {
    if (!OPTION_NAMES.has(key)) fail(key, `is not an option (known: ${[...OPTION_NAMES].join(', ')})`)
  }
  const service = opts.service
  if (typeof service !== 'string' || !SERVICE_NAME.test(service)) {
    fail('service', `must be a Consul service name such as "api", got ${JSON.stringify(service)}`)
  }
  if (opts.agent !== undefined && (opts.agent === null || typeof opts.agent !== 'object')) {
    fail('agent', 'must be an object such as { address: "127.0.0.1:8500" }')
  }
  const health = healthOption(opts.health)
  const register = validateRegisterOption(opts.register)
  if (register !== null && health === null && (register.check ?? 'https') === 'https') {
    fail('register.check', "the default 'https' check calls the health route, which health: false removes; choose 'tcp', 'ttl' or false")
  }
  const certificates = resolveCertificatesOption(opts.certificates)
  const mode = oneOf(opts, 'mode', ['l7', 'agent'] as const)
  const candidate = candidateOption(opts.candidate)
  if (candidate !== null && mode === 'agent') fail('candidate', "needs mode 'l7': in mode 'agent' the agent decides, so there is no local decision to compare with")
  if (certificates.source === 'consul-grpc') {
    // docs/semantics.md#consul-grpc: without a local agent there is no authorize endpoint and nothing to register with.
    if (mode === 'agent') fail('mode', "'agent' asks the local agent's /v1/agent/connect/authorize, which certificates.source 'consul-grpc' runs without; use mode 'l7'")
    if (register !== null) fail('register', "needs a local agent; with certificates.source 'consul-grpc' (agentless, e.g. Kubernetes) the platform registers the instance (consul-k8s)")
  }
  return {
    service,
    agent: opts.agent as AgentOptions | undefined,
    datacenter: optionalName(opts, 'datacenter'),
    namespace: optionalName(opts, 'namespace'),
    partition: optionalName(opts, 'partition'),
    readyTimeout: positiveMs(opts, 'readyTimeout', DEFAULT_READY_TIMEOUT, Infinity),
    defaultPolicy: oneOf(opts, 'defaultPolicy', ['agent', 'allow', 'deny'] as const),
    health,
    mode,
    blockingWait: positiveMs(opts, 'blockingWait', DEFAULT_BLOCKING_WAIT, MAX_BLOCKING_WAIT),
    register,
    certificates,
    recheckUpgrades: optionalBoolean(opts, 'recheckUpgrades'),
    enforcement: oneOf(opts, 'enforcement', ['enforce', 'shadow'] as const),
    candidate,
    maxRegexProgramSize: positiveInteger(opts, 'maxRegexProgramSize', DEFAULT_MAX_REGEX_PROGRAM_SIZE),
    logDenials: logDenialsOption(opts.logDenials)
  }
}

function positiveInteger (opts: Record<string, unknown>, name: string, fallback: number): number {
  const value = opts[name]
  if (value === undefined) return fallback
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1) fail(name, `must be a positive integer, got ${JSON.stringify(value)}`)
  return value
}

/** `readyTimeout` must leave Fastify's `pluginTimeout` (0: none) room, or register() would time out first. */
export function checkReadyTimeout (readyTimeout: number, pluginTimeout: number): void {
  if (pluginTimeout > 0 && readyTimeout >= pluginTimeout) {
    fail('readyTimeout', `(${readyTimeout} ms) must be below Fastify's pluginTimeout (${pluginTimeout} ms): lower it or raise pluginTimeout`)
  }
}

function fail (name: string, reason: string): never {
  throw new InvalidOptionError(name, reason)
}

function optionalName (opts: Record<string, unknown>, name: string): string | undefined {
  const value = opts[name]
  if (value === undefined) return undefined
  if (typeof value !== 'string' || !SERVICE_NAME.test(value)) fail(name, `must be a non-empty name, got ${JSON.stringify(value)}`)
  return value
}

function positiveMs (opts: Record<string, unknown>, name: string, fallback: number, max: number): number {
  const value = opts[name]
  if (value === undefined) return fallback
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value > max) {
    fail(name, `must be a number of milliseconds above 0${max === Infinity ? '' : ` and at most ${max}`}, got ${JSON.stringify(value)}`)
  }
  return Math.floor(value)
}

function optionalBoolean (opts: Record<string, unknown>, name: string): boolean {
  const value = opts[name]
  if (value === undefined) return false
  if (typeof value !== 'boolean') fail(name, `must be true or false, got ${JSON.stringify(value)}`)
  return value
}

function oneOf<T extends string> (opts: Record<string, unknown>, name: string, values: readonly T[]): T {
  const value = opts[name]
  if (value === undefined) return values[0] as T
  if (typeof value !== 'string' || !values.includes(value as T)) {
    fail(name, `must be one of ${values.map((v) => `'${v}'`).join(', ')}, got ${JSON.stringify(value)}`)
  }
  return value as T
}

function logDenialsOption (value: unknown): LogLimit {
  if (value === undefined) return DEFAULT_LOG_LIMIT
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    fail('logDenials', `must be an object such as { sample: 1, perSecond: 10 }, got ${JSON.stringify(value)}`)
  }
  const { sample, perSecond, ...rest } = value as Record<string, unknown>
  const unknown = Object.keys(rest)
  if (unknown.length > 0) fail(`logDenials.${unknown[0] as string}`, 'is not an option (known: sample, perSecond)')
  const count = (v: unknown, name: string, min: number, fallback: number): number => {
    if (v === undefined) return fallback
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) {
      fail(`logDenials.${name}`, `must be an integer of at least ${min}, got ${typeof v === 'number' ? String(v) : JSON.stringify(v)}`)
    }
    return v
  }
  return Object.freeze({
    sample: count(sample, 'sample', 1, DEFAULT_LOG_LIMIT.sample),
    perSecond: count(perSecond, 'perSecond', 0, DEFAULT_LOG_LIMIT.perSecond)
  })
}

function healthOption (value: unknown): { url: string } | null {
  if (value === false) return null
  if (value === undefined) return { url: DEFAULT_HEALTH_URL }
  if (value === null || typeof value !== 'object') fail('health', 'must be false or an object such as { url: "/health" }')
  const { url, ...rest } = value as Record<string, unknown>
  const unknown = Object.keys(rest)
  if (unknown.length > 0) fail(`health.${unknown[0] as string}`, 'is not an option (known: url)')
  if (url === undefined) return { url: DEFAULT_HEALTH_URL }
  if (typeof url !== 'string' || !url.startsWith('/')) fail('health.url', `must be a path starting with "/", got ${JSON.stringify(url)}`)
  return { url }
}

function candidateOption (value: unknown): string | Record<string, unknown> | null {
  if (value === undefined) return null
  if (typeof value === 'string' && value !== '') return value
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) return value as Record<string, unknown>
  fail('candidate', `must be a service-intentions config entry (an object) or the path of a JSON file holding one, got ${JSON.stringify(value)}`)
}
