// Per-route settings (`config.consulNative`), compiled once when the route is declared so the
// request path only reads a ready-made policy.
import type { FastifyRequest, RouteOptions } from 'fastify'
import { InvalidRouteConfigError } from './errors'
import { routeConfigReader } from './fastify-internals'
import { compileOverride } from './intentions/policy'
import type { CompiledOverride, RouteSource } from './intentions/policy'
import type { RouterOptions } from './intentions/path'
import type { Enforcement } from './options'
import { logEvent } from './log'
import type { EventSink } from './log'

/** What a route asks of the plugin, compiled. */
export interface RoutePolicy {
  /** `config.consulNative: false`: no identity needed, intentions not checked. */
  readonly exempt: boolean
  /** Route-level intentions, evaluated before the service's own. */
  readonly override: CompiledOverride | null
  /** Router options for this route when they differ from the server's (a prefixed root route answers with and without its trailing slash). */
  readonly router?: RouterOptions
  /** The route's own `enforcement`; null: the plugin's option applies. */
  readonly enforcement: Enforcement | null
  /**
   * A `@fastify/websocket` route (`websocket: true` or a `wsHandler`, declared after the plugin;
   * one declared before it is compiled without its options, so never marked): its own setting
   * covers its Upgrades. Any other route's Upgrades need the service's policy too.
   */
  readonly websocket?: true
}

/** Routes without `config.consulNative` (and 404s): the service's intentions decide. */
export const SERVICE_POLICY: RoutePolicy = Object.freeze({ exempt: false, override: null, enforcement: null })
export const EXEMPT_POLICY: RoutePolicy = Object.freeze({ exempt: true, override: null, enforcement: null })
const EXPECTED = 'expected false or { sources?: [...], enforcement?: \'enforce\' | \'shadow\' } with at least one of them'

const kRoutePolicy = Symbol('fastify-consul-native.routePolicy')

/**
 * Every route's compiled policy: compiled in the `onRoute` hook for routes declared after the
 * plugin (a bad override fails there), on first use for routes declared before it; 404s get the
 * service's policy.
 */
export class RoutePolicies {
  readonly #router: RouterOptions
  readonly #configOf = routeConfigReader()
  readonly #late = new WeakMap<object, RoutePolicy>()
  /** Every policy compiled so far, by `'METHOD /url'` (status and explain read it). */
  readonly named = new Map<string, RoutePolicy>()
  readonly #fastify: RouteHost

  constructor (router: RouterOptions, fastify: RouteHost) {
    this.#router = router
    this.#fastify = fastify
  }

  /** The `onRoute` hook body: compiles the route's setting once and keeps it in its config. */
  compile (route: RouteOptions): void {
    const name = `${String(route.method)} ${route.url}`
    let policy = withPrefixTwin(this.#compileLogged(route.config?.consulNative, name), route, this.#router)
    const ws = route as { websocket?: unknown, wsHandler?: unknown }
    if (ws.websocket === true || typeof ws.wsHandler === 'function') policy = Object.freeze({ ...policy, websocket: true as const })
    // One entry per method, as status() and explain() name a route: 'GET /url'.
    for (const method of Array.isArray(route.method) ? route.method : [route.method]) this.named.set(`${method} ${route.url}`, policy)
    route.config = { ...route.config, [kRoutePolicy]: policy } as typeof route.config
  }

  #compileLogged (value: unknown, name: string): RoutePolicy {
    const policy = compileRoutePolicy(value, name, this.#fastify.maxRegexProgramSize)
    for (const warning of policy.override?.warnings ?? []) {
      logEvent(this.#fastify.log, 'warn', 'route-path-rule', { route: name }, `route ${name}: ${warning}`)
    }
    return policy
  }

  /** The policy of the route a request reached: a property read on the request path. */
  of (request: FastifyRequest): RoutePolicy {
    const config = this.#configOf(request) as Record<string | symbol, unknown> | undefined
    // Fastify's own test for `request.is404`, on the config already in hand.
    if (config?.url === undefined) return SERVICE_POLICY
    return (config[kRoutePolicy] as RoutePolicy | undefined) ?? this.#late.get(config) ?? this.#compileLate(config, request)
  }

  /**
   * A route declared before the plugin gets the same policy as one declared after: its override,
   * and the prefixed-root twin (docs/semantics.md#paths-declaration-order). Its declaration is
   * gone by now; a context whose URL is registered both with and without a trailing slash is
   * taken as such a twin.
   */
  #compileLate (config: Record<string | symbol, unknown>, request: FastifyRequest): RoutePolicy {
    const url = String(config.url)
    const method = request.method
    const name = `${method} ${url}`
    let policy = this.#compileLogged(config.consulNative, name)
    const host = this.#fastify
    if (url !== '/' && !url.endsWith('/') && host.hasRoute({ method, url }) && host.hasRoute({ method, url: url + '/' })) {
      policy = withPrefixTwin(policy, { prefix: url, routePath: '', prefixTrailingSlash: request.routeOptions.prefixTrailingSlash }, this.#router)
    }
    this.#late.set(config, policy)
    this.named.set(name, policy)
    return policy
  }
}

/** What RoutePolicies needs of the Fastify instance and the plugin's options. */
export interface RouteHost {
  hasRoute (route: { method: string, url: string }): boolean
  /** The plugin's logger (lib/log.ts). */
  readonly log: EventSink
  readonly maxRegexProgramSize?: number
}

/**
 * Compiles a route's `config.consulNative` value. Throws FST_CONSUL_NATIVE_INVALID_ROUTE_CONFIG,
 * naming the route, for anything but `undefined`, `false` or `{ sources: [...] }`.
 */
export function compileRoutePolicy (value: unknown, route: string, maxRegexProgramSize?: number): RoutePolicy {
  if (value === undefined) return SERVICE_POLICY
  if (value === false) return EXEMPT_POLICY
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new InvalidRouteConfigError(route, `${EXPECTED}, got ${describe(value)}`)
  }
  const { sources, enforcement, ...rest } = value as Record<string, unknown>
  const extra = Object.keys(rest)
  if (extra.length > 0) throw new InvalidRouteConfigError(route, `unknown key "${extra[0] as string}" (known: sources, enforcement)`)
  if (enforcement !== undefined && enforcement !== 'enforce' && enforcement !== 'shadow') {
    throw new InvalidRouteConfigError(route, `enforcement must be 'enforce' or 'shadow', got ${describe(enforcement)}`)
  }
  if (sources === undefined) {
    if (enforcement === undefined) throw new InvalidRouteConfigError(route, EXPECTED)
    return Object.freeze({ exempt: false, override: null, enforcement })
  }
  if (!Array.isArray(sources) || sources.length === 0) {
    throw new InvalidRouteConfigError(route, 'sources must be a non-empty array of { name, action } or { name, permissions }')
  }
  try {
    const normalized = sources.map((source, i) => canonicalSource(source, `sources[${i}]`))
    return Object.freeze({ exempt: false, override: compileOverride(normalized, maxRegexProgramSize), enforcement: enforcement ?? null })
  } catch (err) {
    throw new InvalidRouteConfigError(route, (err as Error).message, { cause: err })
  }
}

// Permissions may be written as in JavaScript (`pathPrefix`), as in Consul's JSON API
// (`PathPrefix`) or HCL (`path_prefix`); they are handed to the engine in Consul's JSON form.
const PERMISSION_KEYS = ['Action', 'HTTP', 'JWT', 'PathExact', 'PathPrefix', 'PathRegex', 'Methods', 'Header',
  'Name', 'Present', 'Exact', 'Prefix', 'Suffix', 'Contains', 'Regex', 'Invert', 'IgnoreCase', 'Providers', 'VerifyClaims', 'Path', 'Value']
const CANONICAL = new Map(PERMISSION_KEYS.map((key) => [key.toLowerCase(), key]))

function canonicalSource (source: unknown, at: string): RouteSource {
  if (source === null || typeof source !== 'object' || Array.isArray(source)) return source as RouteSource
  const { permissions, jwt, ...rest } = source as Record<string, unknown>
  const out: Record<string, unknown> = { ...rest }
  if (permissions !== undefined) out.permissions = canonicalKeys(permissions, `${at}.permissions`)
  if (jwt !== undefined) out.jwt = canonicalKeys(jwt, `${at}.jwt`)
  return out as unknown as RouteSource
}

function canonicalKeys (value: unknown, at: string): unknown {
  if (Array.isArray(value)) return value.map((item, i) => canonicalKeys(item, `${at}[${i}]`))
  if (value === null || typeof value !== 'object') return value
  const out: Record<string, unknown> = {}
  for (const [key, item] of Object.entries(value)) {
    const canonical = CANONICAL.get(key.toLowerCase().replace(/_/g, '')) ?? key
    if (Object.hasOwn(out, canonical)) throw new TypeError(`${at}: "${key}" repeats ${canonical}`)
    out[canonical] = canonicalKeys(item, `${at}.${canonical}`)
  }
  return out
}

/**
 * A route declared as `''` or `'/'` under a prefix is served at both `/prefix` and `/prefix/`
 * (Fastify's `prefixTrailingSlash: 'both'`): for it, the two spellings are one, as with
 * `ignoreTrailingSlash`.
 */
export function withPrefixTwin (policy: RoutePolicy, route: { prefix?: string, routePath?: string, prefixTrailingSlash?: string }, router: RouterOptions): RoutePolicy {
  const twin = route.prefix !== undefined && route.prefix !== '' && (route.routePath === '' || route.routePath === '/') &&
    (route.prefixTrailingSlash ?? 'both') === 'both'
  if (!twin || router.ignoreTrailingSlash) return policy
  return Object.freeze({ ...policy, router: Object.freeze({ ...router, ignoreTrailingSlash: true }) })
}

function describe (value: unknown): string {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'an array'
  return `${typeof value} ${JSON.stringify(value)}`
}
