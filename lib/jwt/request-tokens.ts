// The tokens of one request, verified before the (pure, synchronous) decision looks at them:
// for each provider the deciding rule names, the first token at the provider's locations,
// verified by jose. A verified token is remembered per connection (docs/semantics.md#jwt-cache):
// the same token on the same connection is accepted again without a signature check while its
// provider and keys are unchanged and its `exp`/`nbf` still hold at the time of the request.
import type { FastifyBaseLogger } from 'fastify'
import type { JwtTokens } from '../intentions/jwt'
import { logEvent } from '../log'
import { findToken } from './locations'
import type { FoundToken } from './locations'
import type { ActiveProvider, JwtProviders } from './provider'
import { verifyToken } from './verifier'

/** Distinct verified tokens remembered per connection; a connection presenting more starts over. */
const CACHE_PER_CONNECTION = 16

interface CachedToken {
  readonly token: string
  readonly provider: ActiveProvider
  readonly generation: number
  readonly payload: Readonly<Record<string, unknown>>
  readonly expMs: number | null
  readonly nbfMs: number | null
}

/** A provider whose token was found in the request: what its Forward and Forwarding settings act on. */
export interface ProviderToken {
  readonly provider: ActiveProvider
  readonly found: FoundToken
  /** Null when the token did not verify. */
  readonly payload: Readonly<Record<string, unknown>> | null
}

/** What the decision reads (`payload`) and what the hook applies afterwards (the rest). */
export class RequestTokens implements JwtTokens {
  readonly #payloads = new Map<string, Readonly<Record<string, unknown>>>()
  /** Why each provider that was asked for has no verified token: never the token itself. */
  readonly failures: Record<string, string> = {}
  readonly found: ProviderToken[] = []
  /** `Forwarding.HeaderName` of every provider asked for: a caller's own such header never reaches the handler. */
  readonly forwardHeaders: string[] = []
  /** Why a token was found where the application would read another value: the request is refused (400). */
  ambiguity: string | null = null

  payload (provider: string): Readonly<Record<string, unknown>> | null {
    return this.#payloads.get(provider) ?? null
  }

  /** `request.consulJwt`: provider name → verified payload. */
  verified (): Record<string, Readonly<Record<string, unknown>>> {
    return Object.fromEntries(this.#payloads)
  }

  accept (active: ActiveProvider, found: FoundToken, payload: Readonly<Record<string, unknown>>): void {
    this.#payloads.set(active.config.name, payload)
    this.found.push({ provider: active, found, payload })
  }

  reject (name: string, reason: string, active?: ActiveProvider, found?: FoundToken): void {
    this.failures[name] = reason
    if (active !== undefined && found !== undefined) this.found.push({ provider: active, found, payload: null })
  }
}

/**
 * The verified tokens of one provider on one connection. A connection nearly always repeats its
 * last token: comparing it to that one costs a string comparison, where a map lookup would hash
 * the whole token (hundreds of characters) on every request.
 */
class ConnectionTokens {
  #last: CachedToken | null = null
  readonly #byToken = new Map<string, CachedToken>()

  lookup (token: string): CachedToken | undefined {
    const last = this.#last
    if (last !== null && last.token === token) return last
    const found = this.#byToken.get(token)
    if (found !== undefined) this.#last = found
    return found
  }

  add (entry: CachedToken): void {
    if (this.#byToken.size >= CACHE_PER_CONNECTION) this.#byToken.clear()
    this.#byToken.set(entry.token, entry)
    this.#last = entry
  }
}

export interface TokenRequest {
  readonly rawHeaders: readonly string[]
  readonly url: string
  /** The connection (or HTTP/2 session) the request came on. */
  readonly connection: object
}

export class JwtAuthenticator {
  readonly #providers: JwtProviders
  readonly #log: FastifyBaseLogger
  /** connection → provider name → the tokens its verifications found. */
  #byConnection = new WeakMap<object, Map<string, ConnectionTokens>>()
  readonly #missingLogged = new Set<string>()

  constructor (providers: JwtProviders, log: FastifyBaseLogger) {
    this.#providers = providers
    this.#log = log
  }

  /** Forgets every remembered token (the providers changed). */
  clear (): void {
    this.#byConnection = new WeakMap()
  }

  /**
   * The request's tokens for `names`: synchronous when every token found is remembered for the
   * connection (or none is found), otherwise a promise settling once the rest are verified.
   */
  tokensFor (request: TokenRequest, names: readonly string[], nowMs: number): RequestTokens | Promise<RequestTokens> {
    const tokens = new RequestTokens()
    let pending: Array<Promise<void>> | null = null
    const cache = this.#byConnection.get(request.connection)
    for (const name of names) {
      const active = this.#providers.get(name)
      if (active === undefined) {
        tokens.reject(name, 'no jwt-provider config entry of this name')
        this.#logMissing(name)
        continue
      }
      if (active.config.forwardHeader !== null) tokens.forwardHeaders.push(active.config.forwardHeader)
      const found = findToken(active.config.locations, request.rawHeaders, request.url)
      if (found === null) {
        tokens.reject(name, 'no token in the request')
        continue
      }
      if (found.repeated) {
        const reason = `the ${found.location.kind === 'header' ? 'header' : 'query parameter'} ${JSON.stringify(found.location.name)} ` +
          `holding provider ${JSON.stringify(name)}'s token is sent more than once, and the application would read another value than the one checked`
        tokens.reject(name, reason)
        tokens.ambiguity ??= reason
        continue
      }
      const cached = cache?.get(name)?.lookup(found.token)
      if (cached !== undefined && this.#stillValid(cached, active, nowMs)) {
        tokens.accept(active, found, cached.payload)
        continue
      }
      // The key set as it was when the check began: a refresh that lands while the signature is
      // checked (a removed key) must make the next request check again, not find it remembered.
      const generation = active.keys.generation
      ;(pending ??= []).push(verifyToken(found.token, active, nowMs).then((result) => {
        if (!result.ok) {
          tokens.reject(name, result.reason, active, found)
          return
        }
        tokens.accept(active, found, result.payload)
        this.#remember(request.connection, name, {
          token: found.token, provider: active, generation, payload: result.payload, expMs: result.expMs, nbfMs: result.nbfMs
        })
      }))
    }
    return pending === null ? tokens : Promise.all(pending).then(() => tokens)
  }

  #stillValid (cached: CachedToken, active: ActiveProvider, nowMs: number): boolean {
    if (cached.provider !== active || cached.generation !== active.keys.generation) return false
    const skewMs = active.config.clockSkewSeconds * 1000
    return (cached.expMs === null || nowMs < cached.expMs + skewMs) && (cached.nbfMs === null || nowMs >= cached.nbfMs - skewMs)
  }

  #remember (connection: object, provider: string, entry: CachedToken): void {
    let cache = this.#byConnection.get(connection)
    if (cache === undefined) this.#byConnection.set(connection, cache = new Map())
    let tokens = cache.get(provider)
    if (tokens === undefined) cache.set(provider, tokens = new ConnectionTokens())
    tokens.add(entry)
  }

  #logMissing (name: string): void {
    if (this.#missingLogged.has(name)) return
    this.#missingLogged.add(name)
    logEvent(this.#log, 'warn', 'jwt-provider-missing', { provider: name },
      `an intention requires a token from JWT provider ${JSON.stringify(name)}, which Consul does not have: that requirement fails`)
  }

  /** Logs a provider missing from Consul once (called when the policy or the providers change). */
  checkReferenced (names: readonly string[]): void {
    for (const name of names) if (this.#providers.get(name) === undefined) this.#logMissing(name)
  }
}
