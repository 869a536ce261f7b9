// JWT requirements of intentions and route sources, compiled once and checked per request against
// tokens verified beforehand (lib/jwt/). Pure: the payloads come in, a boolean goes out; no
// signature, clock or key is looked at here. Rules: docs/semantics.md#jwt.
import { RuleError, isObject } from './matchers'

/** One `VerifyClaims` entry: the claim at `path` (nested object keys) must equal `value`. */
export interface JwtClaimCheck { readonly path: readonly string[], readonly value: string }

/** One provider of a requirement, with the claims its token must carry. */
export interface JwtProviderCheck { readonly name: string, readonly claims: readonly JwtClaimCheck[] }

/** A compiled `JWT` block: any one provider suffices (docs/semantics.md#jwt-match). */
export interface JwtRequirement { readonly providers: readonly JwtProviderCheck[] }

/** Verified token payloads of one request, by provider name (computed outside the engine). */
export interface JwtTokens {
  /** The payload of a token that `provider` verified (signature, time, audience, issuer), or null. */
  payload (provider: string): Readonly<Record<string, unknown>> | null
  /** Set when a token was read where the application reads another value: the request is refused (400). */
  readonly ambiguity?: string | null
}

const REQUIREMENT_KEYS = new Set(['Providers'])
const PROVIDER_KEYS = new Set(['Name', 'VerifyClaims'])
const CLAIM_KEYS = new Set(['Path', 'Value'])

/**
 * Compiles a `JWT` block as the agent sends it. Null when it asks for nothing: absent, or without
 * providers (Consul then adds no condition either). `strict` (route sources) also rejects unknown
 * keys; the agent's answers were validated by Consul already, and parse.ts checked their types.
 */
export function compileJwtRequirement (raw: unknown, where: string, strict: boolean): JwtRequirement | null {
  if (raw === undefined || raw === null) return null
  if (!isObject(raw)) throw new RuleError(`${where} must be an object`)
  if (strict) knownKeys(raw, REQUIREMENT_KEYS, where)
  const list = raw.Providers
  if (list === undefined || list === null) return null
  if (!Array.isArray(list)) throw new RuleError(`${where}.Providers must be an array`)
  if (list.length === 0) return null
  const providers = list.map((p: unknown, i): JwtProviderCheck => {
    const at = `${where}.Providers[${i}]`
    if (!isObject(p)) throw new RuleError(`${at} must be an object`)
    if (strict) knownKeys(p, PROVIDER_KEYS, at)
    // Consul's IntentionJWTProvider.Validate: the name is required.
    if (typeof p.Name !== 'string' || p.Name === '') throw new RuleError(`${at}.Name must be a non-empty string`)
    const claims = p.VerifyClaims
    if (claims !== undefined && claims !== null && !Array.isArray(claims)) throw new RuleError(`${at}.VerifyClaims must be an array`)
    return Object.freeze({
      name: p.Name,
      claims: Object.freeze((claims ?? []).map((c: unknown, k) => compileClaim(c, `${at}.VerifyClaims[${k}]`, strict)))
    })
  })
  return Object.freeze({ providers: Object.freeze(providers) })
}

function compileClaim (c: unknown, at: string, strict: boolean): JwtClaimCheck {
  if (!isObject(c)) throw new RuleError(`${at} must be an object`)
  if (strict) knownKeys(c, CLAIM_KEYS, at)
  const path = c.Path ?? []
  if (!Array.isArray(path) || path.some((k) => typeof k !== 'string')) throw new RuleError(`${at}.Path must be an array of strings`)
  const value = c.Value ?? ''
  if (typeof value !== 'string') throw new RuleError(`${at}.Value must be a string`)
  return Object.freeze({ path: Object.freeze([...path] as string[]), value })
}

function knownKeys (o: Record<string, unknown>, keys: ReadonlySet<string>, at: string): void {
  for (const k of Object.keys(o)) {
    if (!keys.has(k)) throw new RuleError(`${at}.${k} is not a known field (${[...keys].join(', ')})`)
  }
}

/**
 * Whether the request's tokens meet the requirement: some provider verified a token whose claims
 * all match (docs/semantics.md#jwt-match). `tokens` null: no token was looked at, which fails.
 */
export function jwtSatisfied (requirement: JwtRequirement, tokens: JwtTokens | null): boolean {
  if (tokens === null) return false
  const providers = requirement.providers
  for (let i = 0; i < providers.length; i++) {
    const p = providers[i] as JwtProviderCheck
    const payload = tokens.payload(p.name)
    if (payload !== null && claimsMatch(payload, p.claims)) return true
  }
  return false
}

function claimsMatch (payload: Readonly<Record<string, unknown>>, claims: readonly JwtClaimCheck[]): boolean {
  return firstFailedClaim(payload, claims) === null
}

function firstFailedClaim (payload: Readonly<Record<string, unknown>>, claims: readonly JwtClaimCheck[]): JwtClaimCheck | null {
  for (let i = 0; i < claims.length; i++) {
    const c = claims[i] as JwtClaimCheck
    if (!claimMatches(payload, c.path, c.value)) return c
  }
  return null
}

/**
 * Why each provider of a failed requirement did not satisfy it, for the log: `failures` (why a
 * token did not verify) where it says, else which claim did not match. Never a token or a value.
 */
export function requirementFailures (requirement: JwtRequirement, tokens: JwtTokens, failures: Readonly<Record<string, string>>): Record<string, string> {
  const out: Record<string, string> = {}
  for (const p of requirement.providers) {
    const failure = failures[p.name]
    const payload = tokens.payload(p.name)
    if (failure !== undefined) out[p.name] = failure
    else if (payload === null) out[p.name] = 'no verified token'
    else {
      const claim = firstFailedClaim(payload, p.claims)
      if (claim !== null) out[p.name] = `claim ${JSON.stringify(claim.path.join('.'))} does not match VerifyClaims`
    }
  }
  return out
}

/**
 * The claim at `path` equals `value` exactly, or is an array holding `value` as one of its
 * elements (docs/semantics.md#jwt-claims). Numbers and booleans never equal a string.
 */
export function claimMatches (payload: Readonly<Record<string, unknown>>, path: readonly string[], value: string): boolean {
  if (path.length === 0) return false
  let node: unknown = payload
  for (let i = 0; i < path.length; i++) {
    if (!isObject(node) || !Object.hasOwn(node, path[i] as string)) return false
    node = node[path[i] as string]
  }
  if (typeof node === 'string') return node === value
  return Array.isArray(node) && node.includes(value)
}

/** Every provider name a list of requirements mentions, in first-seen order. */
export function providerNames (requirements: ReadonlyArray<JwtRequirement | null>): string[] {
  const names = new Set<string>()
  for (const r of requirements) if (r !== null) for (const p of r.providers) names.add(p.name)
  return [...names]
}
