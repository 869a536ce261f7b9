// The HTTP client for the local Consul agent (docs/semantics.md#outbound-agent-pools). Two undici
// Pools to the one origin, one request per connection (pipelining 1): blocking queries get a pool of
// their own, with a connection each, and every other call (authorize, TTL passes, registration,
// non-blocking reads) a small pool that long polls never occupy, so a short call never waits
// behind a 10-minute poll, however many watches (each outbound target adds one) are parked. The
// pools live in lib/agent/exchange.ts, on the agent worker thread when `worker` is set
// (lib/agent/worker-transport.ts); requests are built and answers read here, on the caller's thread.
import type { AgentConfig } from './config'
import { ExchangePools } from './exchange'
import type { ExchangeResponse } from './exchange'
import { agentThread } from './worker-transport'
import type { Exchanger } from './worker-transport'
import type { ConnectAuthorizeResponse, IndexedCARoots, Intention, IssuedCert } from './wire'
import {
  parseAgentSelf, parseAuthorize, parseCARoots, parseConfigEntry, parseIntentionMatch, parseIssuedCert, parseServersDatacenter
} from './parse'
import type { AgentSelfView, ConfigEntryKind, ConfigEntryViews, ShapeError } from './parse'
import { AgentInvalidResponseError, AgentResponseError, AgentUnreachableError, InvalidOptionError } from '../errors'
import { formatDurationUs } from '../go-duration'

export type AgentMethod = 'GET' | 'PUT' | 'POST' | 'DELETE'
export type ScopeParam = 'dc' | 'ns' | 'partition'

export interface AgentResponse<T> {
  status: number
  /** `X-Consul-Index` as a safe integer; null when absent or not one. The agent never sends 0. */
  index: number | null
  contentHash: string | null
  /** `X-Consul-Default-ACL-Policy` (the ACL default, not `default_intention_policy`). */
  defaultAclPolicy: 'allow' | 'deny' | null
  knownLeader: boolean | null
  body: T
}

export interface BlockingQuery {
  /** Index of the last answer; missing or 0 makes a non-blocking read. */
  index?: number
  /** How long the agent may hold the answer. Default 300 000, at most 600 000. */
  waitMs?: number
  signal?: AbortSignal
  /** Hash-based blocking (`/v1/agent/service/<id>` only), instead of `index`. */
  hash?: string
}

export interface AgentRequestOptions {
  /** Query parameters; `undefined` values are left out. */
  query?: Record<string, string | undefined>
  /** Sent as JSON. */
  body?: unknown
  signal?: AbortSignal
  /** Headers and body timeout for this call; default: `requestTimeoutMs`, or the blocking wait plus jitter and margin. */
  timeoutMs?: number
  /** Answer 404 with `body: null` instead of throwing. */
  allow404?: boolean
  /** Add `dc`/`ns`/`partition` (those configured; `true` = all three). */
  scoped?: boolean | readonly ScopeParam[]
  /** Make this a blocking query (adds `index`/`hash` and `wait`). */
  blocking?: Omit<BlockingQuery, 'signal'>
}

export interface AgentClientOptions {
  datacenter?: string
  /** ENT only: a CE agent rejects `ns` even as `default`, so it is sent only when set. */
  namespace?: string
  /** ENT only, like `namespace`. */
  partition?: string
  /** Largest response body accepted, in bytes. Default 4 MiB. */
  maxBodyBytes?: number
  /**
   * Upper bound of open connections for short calls (everything but blocking queries). Default 8.
   * Blocking queries use a separate pool without a bound: each parked poll holds its own connection.
   */
  connections?: number
  /** Timeout of a non-blocking call (headers and body). Default 10 000 ms. */
  requestTimeoutMs?: number
  /** Added to `wait × 17/16` for the timeout of a blocking call. Default 5 000 ms. */
  blockingMarginMs?: number
  /** Send the traffic from the process's agent worker thread (lib/agent/worker-transport.ts). Default false. */
  worker?: boolean
}

export const DEFAULT_WAIT_MS = 300_000
export const MAX_WAIT_MS = 600_000
const DEFAULTS = { maxBodyBytes: 4 * 1024 * 1024, connections: 8, requestTimeoutMs: 10_000, blockingMarginMs: 5_000 }
const ERROR_TEXT_CHARS = 512
const ALL_SCOPES: readonly ScopeParam[] = ['dc', 'ns', 'partition']
const CONFIG_ENTRY_SCOPES: Record<ConfigEntryKind, readonly ScopeParam[]> = {
  'service-defaults': ALL_SCOPES,
  // proxy-defaults and mesh live at partition level, outside any namespace.
  'proxy-defaults': ['dc', 'partition'],
  mesh: ['dc', 'partition']
}

const agentStatusKey = Symbol('consul-native.agentStatus')

/** Records on `err` the HTTP status the agent answered with (what agentStatusOf reads). */
export function withAgentStatus<E extends Error> (err: E, status: number): E {
  Object.defineProperty(err, agentStatusKey, { value: status })
  return err
}

/** The HTTP status the agent answered, for an error thrown by AgentClient for a non-2xx answer. */
export function agentStatusOf (err: unknown): number | null {
  const status = (err as { [agentStatusKey]?: unknown } | null)?.[agentStatusKey]
  return typeof status === 'number' ? status : null
}

/** A Go duration: whole seconds when exact (the documented form), milliseconds otherwise. */
export function formatWait (ms: number): string {
  return formatDurationUs(ms * 1000)
}

/** Clamp to Consul's range: the servers cap at 10 minutes, and the leaf endpoint does not cap at all. */
export function clampWait (ms: number | undefined): number {
  if (ms === undefined) return DEFAULT_WAIT_MS
  if (!Number.isFinite(ms) || ms <= 0) throw new InvalidOptionError('waitMs', `must be a positive number of milliseconds, got ${ms}`)
  return Math.min(Math.ceil(ms), MAX_WAIT_MS)
}

/** Consul holds a blocking answer for up to wait + wait/16; give up only after that plus a margin. */
export function blockingTimeout (waitMs: number, marginMs: number): number {
  return waitMs + Math.ceil(waitMs / 16) + marginMs
}

export class AgentClient {
  readonly #config: AgentConfig
  /** The two pools, here or on the worker thread. */
  readonly #exchanger: Exchanger
  readonly #scope: Readonly<Partial<Record<ScopeParam, string>>>
  readonly #maxBodyBytes: number
  readonly #requestTimeoutMs: number
  readonly #blockingMarginMs: number
  #closing: Promise<void> | null = null

  constructor (config: AgentConfig, opts: AgentClientOptions = {}) {
    this.#config = config
    const scope: Partial<Record<ScopeParam, string>> = {}
    if (opts.datacenter !== undefined) scope.dc = scopeValue(opts.datacenter, 'datacenter')
    if (opts.namespace !== undefined) scope.ns = scopeValue(opts.namespace, 'namespace')
    if (opts.partition !== undefined) scope.partition = scopeValue(opts.partition, 'partition')
    this.#scope = scope
    this.#maxBodyBytes = positiveInt(opts.maxBodyBytes, DEFAULTS.maxBodyBytes, 'agent.maxBodyBytes')
    this.#requestTimeoutMs = positiveInt(opts.requestTimeoutMs, DEFAULTS.requestTimeoutMs, 'agent.requestTimeoutMs')
    this.#blockingMarginMs = positiveInt(opts.blockingMarginMs, DEFAULTS.blockingMarginMs, 'agent.blockingMarginMs')
    const connections = positiveInt(opts.connections, DEFAULTS.connections, 'agent.connections')

    const target = { origin: config.origin, socketPath: config.socketPath, tls: config.tls, connections }
    this.#exchanger = opts.worker === true ? agentThread.exchanger(target) : new ExchangePools(target)
  }

  /** Where the agent traffic runs: on the agent worker thread, or in the caller's. */
  get thread (): 'worker' | 'main' {
    return this.#exchanger.thread
  }

  /** Where the agent is, for logs (never the token). */
  get display (): string {
    return this.#config.display
  }

  async request<T = unknown> (method: AgentMethod, path: string, opts: AgentRequestOptions = {}): Promise<AgentResponse<T>> {
    const search = new URLSearchParams()
    for (const [k, v] of Object.entries(opts.query ?? {})) {
      if (v !== undefined) search.append(k, v)
    }
    const scopes = opts.scoped === true ? ALL_SCOPES : opts.scoped === false || opts.scoped === undefined ? [] : opts.scoped
    for (const s of scopes) {
      const v = this.#scope[s]
      if (v !== undefined) search.set(s, v)
    }
    let timeoutMs = this.#requestTimeoutMs
    let pool: 'short' | 'long' = 'short'
    const b = opts.blocking
    if (b !== undefined && ((b.index !== undefined && b.index > 0) || b.hash !== undefined)) {
      pool = 'long'
      const waitMs = clampWait(b.waitMs)
      if (b.hash !== undefined) search.set('hash', b.hash)
      else search.set('index', String(b.index))
      search.set('wait', formatWait(waitMs))
      timeoutMs = blockingTimeout(waitMs, this.#blockingMarginMs)
    }
    if (opts.timeoutMs !== undefined) timeoutMs = opts.timeoutMs
    const qs = search.toString()

    const headers: Record<string, string> = {}
    if (this.#config.token !== null) headers['x-consul-token'] = this.#config.token
    let body: string | undefined
    if (opts.body !== undefined) {
      body = JSON.stringify(opts.body)
      headers['content-type'] = 'application/json'
    }

    let res: ExchangeResponse
    try {
      res = await this.#exchanger.exchange({
        pool,
        method,
        path: qs === '' ? path : `${path}?${qs}`,
        headers,
        body,
        timeoutMs,
        maxBodyBytes: this.#maxBodyBytes,
        allow404: opts.allow404 === true
      }, opts.signal)
    } catch (err) {
      throw this.#transportError(err, timeoutMs, opts.signal)
    }

    const status = res.status
    const ok = status >= 200 && status < 300
    if (!ok && !(status === 404 && opts.allow404 === true)) {
      throw withAgentStatus(new AgentResponseError(method, path, status, errorText(res.text)), status)
    }
    const meta = responseMeta(status, res.headers)
    if (!ok) return { ...meta, body: null as T }
    if (res.overflow) throw new AgentInvalidResponseError(path, `body exceeds ${this.#maxBodyBytes} bytes`)
    let parsed: unknown = null
    // Consul answers every read with JSON (`null` included): an empty body is a broken answer, not "nothing".
    if (res.text === '' && method === 'GET') throw new AgentInvalidResponseError(path, 'empty body')
    if (res.text !== '') {
      try {
        parsed = JSON.parse(res.text)
      } catch (err) {
        throw new AgentInvalidResponseError(path, `not JSON: ${(err as Error).message}`, { cause: err })
      }
    }
    return { ...meta, body: parsed as T }
  }

  /** `GET /v1/agent/connect/ca/leaf/<service>`: the service's certificate and key. */
  async leaf (service: string, q: BlockingQuery = {}): Promise<AgentResponse<IssuedCert>> {
    const path = `/v1/agent/connect/ca/leaf/${encodeURIComponent(service)}`
    const res = await this.request('GET', path, { blocking: q, signal: q.signal, scoped: ALL_SCOPES })
    return withBody(res, path, (b) => parseIssuedCert(b, service))
  }

  /** `GET /v1/agent/connect/ca/roots`: every root to trust (not only the active one). */
  async roots (q: BlockingQuery = {}): Promise<AgentResponse<IndexedCARoots>> {
    const path = '/v1/agent/connect/ca/roots'
    const res = await this.request('GET', path, { blocking: q, signal: q.signal, scoped: ['dc'] })
    return withBody(res, path, parseCARoots)
  }

  /** `GET /v1/connect/intentions/match?by=destination&name=<destination>`, in Consul's precedence order. */
  async intentionsMatch (destination: string, q: BlockingQuery = {}): Promise<AgentResponse<Intention[]>> {
    const path = '/v1/connect/intentions/match'
    const res = await this.request('GET', path, {
      query: { by: 'destination', name: destination }, blocking: q, signal: q.signal, scoped: ALL_SCOPES
    })
    return withBody(res, path, (b) => parseIntentionMatch(b, destination))
  }

  /** `GET /v1/config/<kind>/<name>`; a missing entry (404) is a valid answer: `body` null. */
  async configEntry<K extends ConfigEntryKind> (kind: K, name: string, q: BlockingQuery = {}): Promise<AgentResponse<ConfigEntryViews[K] | null>> {
    const path = `/v1/config/${kind}/${encodeURIComponent(name)}`
    const res = await this.request('GET', path, { blocking: q, signal: q.signal, allow404: true, scoped: CONFIG_ENTRY_SCOPES[kind] })
    if (res.status === 404) return { ...res, body: null }
    return withBody(res, path, (b) => parseConfigEntry(kind, b))
  }

  /**
   * `GET /v1/config/jwt-provider`: every provider, unparsed (lib/jwt/provider.ts compiles them).
   * Null from an agent older than Consul 1.16, which does not know the kind (docs/semantics.md#jwt-providers).
   */
  async jwtProviders (q: BlockingQuery = {}): Promise<AgentResponse<unknown[] | null>> {
    const path = '/v1/config/jwt-provider'
    let res: AgentResponse<unknown>
    try {
      res = await this.request('GET', path, { blocking: q, signal: q.signal, scoped: ['dc', 'partition'] })
    } catch (err) {
      if (agentStatusOf(err) === 500 && (err as Error).message.includes('invalid config entry kind')) {
        return { status: 500, index: null, contentHash: null, defaultAclPolicy: null, knownLeader: null, body: null }
      }
      throw err
    }
    return withBody(res, path, (b) => {
      if (b === null) return []
      if (!Array.isArray(b)) throw new TypeError('expected an array of config entries')
      return b as unknown[]
    })
  }

  /** `GET /v1/agent/self` (needs `agent:read`), reduced to what decides the default intention policy. */
  async agentSelf (signal?: AbortSignal): Promise<AgentResponse<AgentSelfView>> {
    const path = '/v1/agent/self'
    return withBody(await this.request('GET', path, { signal }), path, parseAgentSelf)
  }

  /**
   * The datacenter of the agent or server at `address`: from `/v1/agent/self`, or, for a token
   * without `agent:read` (a service identity's, as consul-k8s' login gives), from the servers
   * of `/v1/health/service/consul` (`service:read` and `node:read`).
   */
  async datacenter (signal?: AbortSignal): Promise<string> {
    try {
      return (await this.agentSelf(signal)).body.datacenter
    } catch (err) {
      if (agentStatusOf(err) !== 403) throw err
      const path = '/v1/health/service/consul'
      return withBody(await this.request('GET', path, { signal }), path, parseServersDatacenter).body
    }
  }

  /** `POST /v1/agent/connect/authorize`: the agent's L4 decision, for cross-checks only (it treats L7 as deny). */
  async authorize (target: string, clientCertURI: string, signal?: AbortSignal): Promise<ConnectAuthorizeResponse> {
    const path = '/v1/agent/connect/authorize'
    const res = await this.request('POST', path, {
      body: { Target: target, ClientCertURI: clientCertURI }, signal, scoped: ['ns', 'partition']
    })
    return withBody(res, path, parseAuthorize).body
  }

  /** Destroys open connections, failing in-flight long polls at once, so shutdown is prompt. Idempotent. */
  close (): Promise<void> {
    this.#closing ??= this.#exchanger.destroy()
    return this.#closing
  }

  #transportError (err: unknown, timeoutMs: number, signal: AbortSignal | undefined): unknown {
    // The caller's own abort is not an agent failure: hand back its reason, as fetch() does.
    if (signal?.aborted === true) return signal.reason
    const e = err as { code?: unknown, message?: unknown }
    let reason: string
    if (this.#closing !== null) reason = 'client closed'
    else if (e.code === 'UND_ERR_HEADERS_TIMEOUT' || e.code === 'UND_ERR_BODY_TIMEOUT') reason = `no response within ${timeoutMs} ms`
    else reason = String(e.message)
    return new AgentUnreachableError(this.#config.display, reason, { cause: err })
  }
}

function withBody<T> (res: AgentResponse<unknown>, path: string, parse: (body: unknown) => T): AgentResponse<T> {
  try {
    return { ...res, body: parse(res.body) }
  } catch (err) {
    // The parse functions throw ShapeError, whose message names the JSON path at fault.
    throw new AgentInvalidResponseError(path, (err as ShapeError).message, { cause: err })
  }
}

function responseMeta (status: number, headers: ExchangeResponse['headers']): Omit<AgentResponse<unknown>, 'body'> {
  const index = header(headers, 'x-consul-index')
  const policy = header(headers, 'x-consul-default-acl-policy')
  const leader = header(headers, 'x-consul-knownleader')
  return {
    status,
    index: index !== null && /^[0-9]+$/.test(index) && Number.isSafeInteger(Number(index)) ? Number(index) : null,
    contentHash: header(headers, 'x-consul-contenthash'),
    defaultAclPolicy: policy === 'allow' || policy === 'deny' ? policy : null,
    knownLeader: leader === 'true' ? true : leader === 'false' ? false : null
  }
}

function header (headers: ExchangeResponse['headers'], name: string): string | null {
  const v = headers[name]
  const first = Array.isArray(v) ? v[0] : v
  return first === undefined || first === '' ? null : first
}

/** Consul's error bodies are one line of plain text; keep them readable in a log line. */
function errorText (text: string): string {
  const t = text.trim().replace(/\s+/g, ' ')
  if (t === '') return '(empty body)'
  return t.length > ERROR_TEXT_CHARS ? `${t.slice(0, ERROR_TEXT_CHARS)}…` : t
}

function scopeValue (value: unknown, name: string): string {
  if (typeof value !== 'string' || value === '') throw new InvalidOptionError(name, 'must be a non-empty string')
  return value
}

function positiveInt (value: unknown, fallback: number, name: string): number {
  if (value === undefined) return fallback
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
    throw new InvalidOptionError(name, `must be a positive integer, got ${String(value)}`)
  }
  return value
}
