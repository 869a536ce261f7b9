// A provider's JSON Web Key Set: inline (base64 in the entry), a local file, or fetched from a
// remote URI and cached (docs/semantics.md#jwt-key-sets). The edge where keys come in; the
// verifier only asks for a key. A failed fetch keeps the last good keys and is logged once per
// distinct cause; `generation` changes whenever the keys do, which voids cached verifications.
import { readFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import type { FastifyBaseLogger } from 'fastify'
import { createLocalJWKSet, errors } from 'jose'
import type { JSONWebKeySet, JWTVerifyGetKey } from 'jose'
import { Agent, request } from 'undici'
import { logEvent } from '../log'
import type { KeySetSource } from './provider'

/** Reported on `fastify.consulNative.events` as `'jwks'` after each fetch of a remote key set, or load of a local one. */
export interface KeySetEvent {
  provider: string
  /** Keys in the set after this load; null when it failed (the last good keys, if any, stay). */
  keys: number | null
  error: string | null
}
export type KeySetEvents = (event: KeySetEvent) => void

/**
 * jose's key lookup for jwtVerify (its `JWTVerifyGetKey`), described without naming jose: jose is an
 * ES module only, and a CommonJS declaration file that imports its types fails a consumer's type
 * check under moduleResolution node16 (TS1541). It is only ever handed back to jose
 * (lib/jwt/verifier.ts), as jose's type.
 */
export type KeyLookup = (...args: never[]) => unknown

export interface KeySet {
  /** Changes whenever the keys do. */
  readonly generation: number
  /** Why no key is usable, or null. */
  readonly error: string | null
  /** For jose's jwtVerify. Throws when no key set is loaded. */
  readonly getKey: KeyLookup
  /** Settles after the first load (local), or the first fetch and its retries (remote, `FetchAsynchronously: false`). */
  ready (): Promise<void>
  stop (): void
}

/** After an unknown `kid`, the remote set is fetched again at most this often, or the cache duration if shorter (key rotation without waiting for the cache). */
const MISS_REFRESH_COOLDOWN_MS = 5_000
const MAX_JWKS_BYTES = 1 << 20

export function newKeySet (provider: string, source: KeySetSource, log: FastifyBaseLogger, events: KeySetEvents): KeySet {
  return source.kind === 'remote'
    ? new RemoteKeySet(provider, source, log, events)
    : new LocalKeySet(provider, source, log, events)
}

/** Parses a JWKS document; throws with a reason naming what is wrong. */
function parseJwks (text: string): { set: JWTVerifyGetKey, count: number } {
  let doc: unknown
  try {
    doc = JSON.parse(text)
  } catch {
    throw new Error('the key set is not JSON')
  }
  if (doc === null || typeof doc !== 'object' || !Array.isArray((doc as { keys?: unknown }).keys)) {
    throw new Error('the key set has no "keys" array')
  }
  const jwks = doc as JSONWebKeySet
  // Envoy tries a key without a `kid` for any token: such keys are also looked up on their own,
  // for a token whose `kid` no key carries.
  const withoutKid = jwks.keys.filter((jwk) => jwk === null || typeof jwk !== 'object' || jwk.kid === undefined)
  const anyKid = withoutKid.length === 0 ? null : createLocalJWKSet({ keys: withoutKid })
  const byKid = createLocalJWKSet(jwks)
  const set: JWTVerifyGetKey = anyKid === null
    ? byKid
    : async (header, token) => {
      try {
        return await byKid(header, token)
      } catch (err) {
        if (!(err instanceof errors.JWKSNoMatchingKey) || header.kid === undefined) throw err
        return await anyKid({ ...header, kid: undefined }, token)
      }
    }
  return { set, count: jwks.keys.length }
}

abstract class BaseKeySet implements KeySet {
  generation = 0
  error: string | null = 'key set not loaded yet'
  protected set: JWTVerifyGetKey | null = null
  protected text: string | null = null
  protected stopped = false
  #lastLogged: string | null = null

  constructor (protected readonly provider: string, protected readonly log: FastifyBaseLogger, protected readonly events: KeySetEvents) {}

  abstract ready (): Promise<void>
  abstract stop (): void

  readonly getKey: JWTVerifyGetKey = async (header, token) => {
    const set = this.set
    if (set === null) throw new KeySetUnavailableError(this.error as string)
    return await set(header, token)
  }

  /** Installs a loaded document; a document that does not parse keeps the previous keys. */
  protected install (text: string): void {
    if (text === this.text) {
      this.#settle(null)
      return
    }
    const { set, count } = parseJwks(text)
    this.set = set
    this.text = text
    this.generation++
    this.#settle(null)
    this.events({ provider: this.provider, keys: count, error: null })
  }

  protected failed (reason: string): void {
    this.#settle(reason)
    this.events({ provider: this.provider, keys: null, error: reason })
  }

  #settle (failure: string | null): void {
    // With last good keys, a failure is logged but does not make the set unusable.
    this.error = this.set === null ? failure : null
    if (failure === null) {
      if (this.#lastLogged !== null) {
        logEvent(this.log, 'info', 'jwks-recovered', { provider: this.provider }, 'JWT key set loaded again')
      }
      this.#lastLogged = null
    } else if (failure !== this.#lastLogged) {
      this.#lastLogged = failure
      logEvent(this.log, 'warn', 'jwks-failed', { provider: this.provider, reason: failure, keptLastGood: this.set !== null },
        `cannot load the key set of JWT provider ${JSON.stringify(this.provider)}`)
    }
  }
}

/** Keys that cannot be used: verification fails with this reason. */
export class KeySetUnavailableError extends Error {
  readonly code = 'ERR_CONSUL_NATIVE_JWKS_UNAVAILABLE'
}

/** Loaded at once (a small local read, on a provider change only), so a changed provider has its keys before any request sees it. */
class LocalKeySet extends BaseKeySet {
  constructor (provider: string, source: Exclude<KeySetSource, { kind: 'remote' }>, log: FastifyBaseLogger, events: KeySetEvents) {
    super(provider, log, events)
    let text: string
    try {
      text = source.kind === 'inline' ? source.jwks : readFileSync(source.filename, 'utf8')
    } catch (err) {
      this.failed(`cannot read ${(source as { filename: string }).filename}: ${(err as Error).message}`)
      return
    }
    try {
      this.install(text)
    } catch (err) {
      this.failed((err as Error).message)
    }
  }

  async ready (): Promise<void> {}

  stop (): void {
    this.stopped = true
  }
}

class RemoteKeySet extends BaseKeySet {
  readonly #source: Extract<KeySetSource, { kind: 'remote' }>
  #dispatcher: Agent | null = null
  #timer: NodeJS.Timeout | undefined = undefined
  #inFlight: Promise<void> | null = null
  #lastStart = 0
  readonly #first: Promise<void>

  constructor (provider: string, source: Extract<KeySetSource, { kind: 'remote' }>, log: FastifyBaseLogger, events: KeySetEvents) {
    super(provider, log, events)
    this.#source = source
    this.#first = this.refresh()
  }

  /** `FetchAsynchronously: true` does not hold readiness back; the first request may still find no keys yet. */
  async ready (): Promise<void> {
    if (!this.#source.fetchAsynchronously) await this.#first
  }

  override readonly getKey: JWTVerifyGetKey = async (header, token) => {
    try {
      if (this.set === null) throw new KeySetUnavailableError(this.error as string)
      return await this.set(header, token)
    } catch (err) {
      // A key the set does not have: perhaps rotated in since the last fetch.
      const code = (err as { code?: string }).code
      if ((code !== 'ERR_JWKS_NO_MATCHING_KEY' && !(err instanceof KeySetUnavailableError)) ||
        Date.now() - this.#lastStart < Math.min(MISS_REFRESH_COOLDOWN_MS, this.#source.cacheMs) || this.stopped) throw err
      await this.refresh()
      if (this.set === null) throw new KeySetUnavailableError(this.error as string)
      return await this.set(header, token)
    }
  }

  /** One fetch cycle (the first attempt and its retries); concurrent callers share it. */
  async refresh (): Promise<void> {
    if (this.#inFlight !== null) return await this.#inFlight
    this.#lastStart = Date.now()
    this.#inFlight = this.#cycle().finally(() => { this.#inFlight = null })
    await this.#inFlight
  }

  async #cycle (): Promise<void> {
    const s = this.#source
    let lastError = ''
    for (let attempt = 0; attempt <= s.retries && !this.stopped; attempt++) {
      if (attempt > 0) await delay(backoff(attempt, s.backoffBaseMs, s.backoffMaxMs))
      try {
        this.install(await this.#fetch())
        this.#schedule(s.cacheMs)
        return
      } catch (err) {
        lastError = (err as Error).message
      }
    }
    if (this.stopped) return
    this.failed(`GET ${s.uri}: ${lastError}`)
    // Keep trying in the background, at the backoff's maximum interval.
    this.#schedule(s.backoffMaxMs)
  }

  async #fetch (): Promise<string> {
    const s = this.#source
    const res = await request(s.uri, {
      method: 'GET',
      headers: { accept: 'application/json' },
      dispatcher: await this.#agent(),
      signal: AbortSignal.timeout(s.timeoutMs)
    })
    if (res.statusCode !== 200) {
      await res.body.dump()
      throw new Error(`status ${res.statusCode}`)
    }
    const chunks: Buffer[] = []
    let size = 0
    for await (const chunk of res.body) {
      size += (chunk as Buffer).length
      if (size > MAX_JWKS_BYTES) throw new Error('key set larger than 1 MiB')
      chunks.push(chunk as Buffer)
    }
    return Buffer.concat(chunks).toString('utf8')
  }

  async #agent (): Promise<Agent> {
    if (this.#dispatcher !== null) return this.#dispatcher
    const trusted = this.#source.trustedCa
    let ca: string | undefined
    if (trusted !== null) {
      if (trusted.startsWith('file:')) ca = await readFile(trusted.slice(5), 'utf8')
      else if (trusted.startsWith('env:')) ca = process.env[trusted.slice(4)]
      else ca = trusted
    }
    this.#dispatcher = new Agent({ connect: ca === undefined ? {} : { ca }, connections: 1 })
    return this.#dispatcher
  }

  #schedule (ms: number): void {
    if (this.stopped) return
    clearTimeout(this.#timer)
    this.#timer = setTimeout(() => { this.refresh().catch(() => {}) }, ms).unref()
  }

  stop (): void {
    this.stopped = true
    clearTimeout(this.#timer)
    this.#dispatcher?.close().catch(() => {})
  }
}

/** Jittered exponential backoff: base × 2^(attempt-1), capped, with up to half of it random. */
function backoff (attempt: number, baseMs: number, maxMs: number): number {
  const ms = Math.min(maxMs, baseMs * 2 ** (attempt - 1))
  return ms / 2 + Math.random() * (ms / 2)
}

async function delay (ms: number): Promise<void> {
  await new Promise<void>((resolve) => setTimeout(resolve, ms).unref())
}
