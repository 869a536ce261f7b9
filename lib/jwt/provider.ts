// `jwt-provider` config entries: validated as Consul validates them on write, with Consul's
// defaults filled in, and kept by name with their key sets (docs/semantics.md#jwt-providers).
// A key set survives an update that leaves its provider unchanged, so its cache and its verified
// tokens do too.
import type { FastifyBaseLogger } from 'fastify'
import { parseDurationUs } from '../go-duration'
import { isObject } from '../intentions/matchers'
import { type KeySet, type KeySetEvents, newKeySet } from './key-sets'
import { DEFAULT_LOCATIONS, type TokenLocation } from './locations'

/** Consul's DefaultClockSkewSeconds. */
export const DEFAULT_CLOCK_SKEW_SECONDS = 30
/** Envoy's default cache duration for a remote key set (docs/semantics.md#jwt-key-sets). */
export const DEFAULT_CACHE_MS = 5 * 60_000
/** Consul sends no usable timeout (it truncates to whole seconds); this is the plugin's. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 5_000
/** Consul's documented retry backoff defaults: base 1 s, maximum 10 × base. */
export const DEFAULT_BACKOFF_BASE_MS = 1_000

export type KeySetSource =
  | { readonly kind: 'inline', readonly jwks: string }
  | { readonly kind: 'file', readonly filename: string }
  | {
    readonly kind: 'remote'
    readonly uri: string
    readonly timeoutMs: number
    readonly cacheMs: number
    /** `FetchAsynchronously: false`: readiness waits for the first fetch. */
    readonly fetchAsynchronously: boolean
    readonly retries: number
    readonly backoffBaseMs: number
    readonly backoffMaxMs: number
    /** PEM of `JWKSCluster.TLSCertificates.TrustedCA`; null: the system's CAs. */
    readonly trustedCa: string | null
  }

/** One provider, compiled. */
export interface JwtProviderConfig {
  readonly name: string
  /** The `iss` a token must carry, exactly. */
  readonly issuer: string
  /** When non-empty, `aud` must name one of them. */
  readonly audiences: readonly string[]
  readonly locations: readonly TokenLocation[]
  /** `Forwarding.HeaderName`, lower case; null when not forwarding. */
  readonly forwardHeader: string | null
  readonly padForwardPayload: boolean
  readonly clockSkewSeconds: number
  readonly keySet: KeySetSource
  /** The entry as sent, without Raft indexes: equal fingerprints need no new key set. */
  readonly fingerprint: string
}

/** An entry Consul would have refused on write; the message is Consul's where it has one. */
export class InvalidProviderError extends Error {
  constructor (readonly provider: string, reason: string) {
    super(`jwt-provider ${JSON.stringify(provider)}: ${reason}`)
    this.name = 'InvalidProviderError'
  }
}

type Obj = Record<string, unknown>

function obj (o: Obj, key: string, at: string): Obj | null {
  const v = o[key]
  if (v === undefined || v === null) return null
  if (!isObject(v)) throw new TypeError(`${at}${key} must be an object`)
  return v
}
function str (o: Obj | null, key: string, at: string): string {
  const v = o?.[key]
  if (v === undefined || v === null) return ''
  if (typeof v !== 'string') throw new TypeError(`${at}${key} must be a string`)
  return v
}
function num (o: Obj | null, key: string, at: string): number {
  const v = o?.[key]
  if (v === undefined || v === null) return 0
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new TypeError(`${at}${key} must be a number`)
  return v
}
function bool (o: Obj | null, key: string, at: string): boolean {
  const v = o?.[key]
  if (v === undefined || v === null) return false
  if (typeof v !== 'boolean') throw new TypeError(`${at}${key} must be a boolean`)
  return v
}
function list (o: Obj | null, key: string, at: string): unknown[] {
  const v = o?.[key]
  if (v === undefined || v === null) return []
  if (!Array.isArray(v)) throw new TypeError(`${at}${key} must be an array`)
  return v
}

/** A Go time.Duration as JSON: nanoseconds (Consul's encoding), or duration text; in milliseconds. */
function durationMs (o: Obj | null, key: string, at: string): number {
  const v = o?.[key]
  if (v === undefined || v === null) return 0
  if (typeof v === 'number' && Number.isFinite(v) && v >= 0) return v / 1e6
  const us = typeof v === 'string' ? parseDurationUs(v) : null
  if (us === null) throw new TypeError(`${at}${key} must be a duration`)
  return us / 1_000
}

function exactlyOne (...present: boolean[]): boolean {
  return present.filter(Boolean).length === 1
}

/**
 * Compiles one entry of `GET /v1/config/jwt-provider`. Throws a TypeError for a body of the wrong
 * shape and InvalidProviderError for what Consul's JWTProviderConfigEntry.Validate refuses.
 */
export function compileProvider (entry: unknown, at: string): JwtProviderConfig {
  if (!isObject(entry)) throw new TypeError(`${at} must be an object`)
  const name = str(entry, 'Name', `${at}.`)
  if (name === '') throw new InvalidProviderError(name, 'Name is required')
  const fail = (reason: string): never => { throw new InvalidProviderError(name, reason) }
  const p = `${at}.`
  const jwks = obj(entry, 'JSONWebKeySet', p)
  if (jwks === null) fail('JSONWebKeySet is required')
  const local = obj(jwks as Obj, 'Local', `${p}JSONWebKeySet.`)
  const remote = obj(jwks as Obj, 'Remote', `${p}JSONWebKeySet.`)
  if (!exactlyOne(local !== null, remote !== null)) fail('must specify exactly one of Local or Remote JSON Web key set')

  let keySet: KeySetSource
  if (local !== null) {
    const lp = `${p}JSONWebKeySet.Local.`
    const inline = str(local, 'JWKS', lp)
    const filename = str(local, 'Filename', lp)
    if (!exactlyOne(inline !== '', filename !== '')) fail('must specify exactly one of String or filename for local keyset')
    if (inline !== '') {
      // Go's base64 decoder, which Consul validates with, skips line breaks (`base64` wraps at 76).
      const compact = inline.replace(/[\r\n]/g, '')
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(compact) || compact.length % 4 !== 0) fail('JWKS must be valid base64 encoded string')
      keySet = { kind: 'inline', jwks: Buffer.from(compact, 'base64').toString('utf8') }
    } else {
      keySet = { kind: 'file', filename }
    }
  } else {
    const r = remote as Obj
    const rp = `${p}JSONWebKeySet.Remote.`
    const uri = str(r, 'URI', rp)
    if (uri === '') fail('Remote JWKS URI is required')
    // Go's url.ParseRequestURI: an absolute URI or an absolute path (which then fails to fetch).
    if (!uri.startsWith('/') && !/^[a-z][a-z0-9+.-]*:/i.test(uri)) fail(`Remote JWKS URI is invalid: parse ${JSON.stringify(uri)}: invalid URI for request, uri: ${uri}`)
    const retry = obj(r, 'RetryPolicy', rp)
    const backoff = retry === null ? null : obj(retry, 'RetryPolicyBackOff', `${rp}RetryPolicy.`)
    const baseMs = durationMs(backoff, 'BaseInterval', `${rp}RetryPolicy.RetryPolicyBackOff.`)
    const maxMs = durationMs(backoff, 'MaxInterval', `${rp}RetryPolicy.RetryPolicyBackOff.`)
    if (maxMs !== 0 && baseMs > maxMs) fail('retry policy backoff\'s MaxInterval should be greater or equal to BaseInterval')
    const cluster = obj(r, 'JWKSCluster', rp)
    const tls = cluster === null ? null : obj(cluster, 'TLSCertificates', `${rp}JWKSCluster.`)
    let trustedCa: string | null = null
    if (tls !== null) {
      const trusted = obj(tls, 'TrustedCA', `${rp}JWKSCluster.TLSCertificates.`)
      const instance = obj(tls, 'CaCertificateProviderInstance', `${rp}JWKSCluster.TLSCertificates.`)
      if (!exactlyOne(trusted !== null, instance !== null)) {
        fail('must specify exactly one of: CaCertificateProviderInstance or TrustedCA for JKWS\' TLSCertificates')
      }
      if (trusted !== null) trustedCa = trustedCaOf(trusted, fail)
    }
    const base = baseMs > 0 ? baseMs : DEFAULT_BACKOFF_BASE_MS
    const timeoutMs = num(r, 'RequestTimeoutMs', rp)
    const cacheMs = durationMs(r, 'CacheDuration', rp)
    keySet = {
      kind: 'remote',
      uri,
      timeoutMs: timeoutMs > 0 ? timeoutMs : DEFAULT_REQUEST_TIMEOUT_MS,
      cacheMs: cacheMs > 0 ? cacheMs : DEFAULT_CACHE_MS,
      fetchAsynchronously: bool(r, 'FetchAsynchronously', rp),
      retries: Math.max(0, Math.trunc(num(retry, 'NumRetries', `${rp}RetryPolicy.`))),
      backoffBaseMs: base,
      backoffMaxMs: maxMs > 0 ? maxMs : 10 * base,
      trustedCa
    }
  }

  const locations = list(entry, 'Locations', p).map((raw, i) => compileLocation(raw, `${p}Locations[${i}]`, fail))
  const forwarding = obj(entry, 'Forwarding', p)
  let forwardHeader: string | null = null
  if (forwarding !== null) {
    forwardHeader = str(forwarding, 'HeaderName', `${p}Forwarding.`).toLowerCase()
    if (forwardHeader === '') fail('Header name required for forwarding config')
  }
  const audiences = list(entry, 'Audiences', p).map((a, i) => {
    if (typeof a !== 'string') throw new TypeError(`${p}Audiences[${i}] must be a string`)
    return a
  })
  const skew = num(entry, 'ClockSkewSeconds', p)
  const { CreateIndex: _c, ModifyIndex: _m, Hash: _h, ...rest } = entry
  return Object.freeze({
    name,
    issuer: str(entry, 'Issuer', p),
    audiences: Object.freeze(audiences),
    locations: Object.freeze(locations.length > 0 ? locations : DEFAULT_LOCATIONS),
    forwardHeader,
    padForwardPayload: forwarding === null ? false : bool(forwarding, 'PadForwardPayloadHeader', `${p}Forwarding.`),
    // Consul's Normalize turns 0 into the default; a negative skew means none.
    clockSkewSeconds: skew === 0 ? DEFAULT_CLOCK_SKEW_SECONDS : Math.max(0, skew),
    keySet: Object.freeze(keySet),
    fingerprint: JSON.stringify(rest)
  })
}

function trustedCaOf (trusted: Obj, fail: (reason: string) => never): string {
  const at = 'TrustedCA.'
  const filename = str(trusted, 'Filename', at)
  const env = str(trusted, 'EnvironmentVariable', at)
  const inline = str(trusted, 'InlineString', at)
  const bytes = str(trusted, 'InlineBytes', at) // []byte is base64 in JSON
  if (!exactlyOne(filename !== '', env !== '', inline !== '', bytes !== '')) {
    fail('must specify exactly one of: Filename, EnvironmentVariable, InlineString or InlineBytes for JWKS\' TrustedCA')
  }
  if (inline !== '') return inline
  if (bytes !== '') return Buffer.from(bytes, 'base64').toString('utf8')
  // Read when the key set starts (an edge); here only named.
  return filename !== '' ? `file:${filename}` : `env:${env}`
}

function compileLocation (raw: unknown, at: string, fail: (reason: string) => never): TokenLocation {
  if (!isObject(raw)) throw new TypeError(`${at} must be an object`)
  const header = obj(raw, 'Header', `${at}.`)
  const query = obj(raw, 'QueryParam', `${at}.`)
  const cookie = obj(raw, 'Cookie', `${at}.`)
  if (!exactlyOne(header !== null, query !== null, cookie !== null)) fail('must set exactly one of: JWT location header, query param or cookie')
  if (header !== null) {
    const name = str(header, 'Name', `${at}.Header.`)
    if (name === '') fail('JWT location header name must be specified')
    return Object.freeze({ kind: 'header', name: name.toLowerCase(), prefix: str(header, 'ValuePrefix', `${at}.Header.`), forward: bool(header, 'Forward', `${at}.Header.`) })
  }
  if (query !== null) {
    const name = str(query, 'Name', `${at}.QueryParam.`)
    if (name === '') fail('JWT location query param name must be specified')
    return Object.freeze({ kind: 'query', name, prefix: '', forward: true })
  }
  const name = str(cookie, 'Name', `${at}.Cookie.`)
  if (name === '') fail('JWT location cookie name must be specified')
  return Object.freeze({ kind: 'cookie', name, prefix: '', forward: true })
}

/** A provider in force: its settings and its key set. */
export interface ActiveProvider {
  readonly config: JwtProviderConfig
  readonly keys: KeySet
}

/**
 * The providers Consul has, by name. `update` swaps in a new list (compiled first, so a bad list
 * changes nothing) and keeps the key sets of unchanged providers; removed ones are stopped.
 */
export class JwtProviders {
  #byName = new Map<string, ActiveProvider>()
  readonly #log: FastifyBaseLogger
  readonly #events: KeySetEvents

  constructor (log: FastifyBaseLogger, events: KeySetEvents) {
    this.#log = log
    this.#events = events
  }

  get (name: string): ActiveProvider | undefined {
    return this.#byName.get(name)
  }

  get names (): string[] {
    return [...this.#byName.keys()]
  }

  /** Compiles and installs the entries of `GET /v1/config/jwt-provider`; throws, changing nothing, when one is invalid. */
  update (entries: readonly unknown[]): void {
    const configs = entries.map((e, i) => compileProvider(e, `[${i}]`))
    const next = new Map<string, ActiveProvider>()
    for (const config of configs) {
      const current = this.#byName.get(config.name)
      next.set(config.name, current !== undefined && current.config.fingerprint === config.fingerprint
        ? current
        : { config, keys: newKeySet(config.name, config.keySet, this.#log, this.#events) })
    }
    for (const [name, active] of this.#byName) if (next.get(name) !== active) active.keys.stop()
    this.#byName = next
  }

  /** Settles once every named provider that must be fetched before serving has had its first fetch. */
  async ready (names: readonly string[]): Promise<void> {
    await Promise.all(names.map(async (name) => await this.#byName.get(name)?.keys.ready()))
  }

  stop (): void {
    for (const active of this.#byName.values()) active.keys.stop()
    this.#byName = new Map()
  }
}
