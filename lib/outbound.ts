// Outbound calls to other mesh services: discovery of their Connect-capable instances
// (`/v1/health/connect/<service>`, docs/semantics.md#discovery) kept current by a blocking watch, and mTLS with
// the current leaf, where the peer must present exactly the target service's SPIFFE ID
// (docs/semantics.md#outbound-scope). One undici Pool per instance; a new leaf or new roots replace
// every pool (the old ones close gracefully). An instance that cannot be reached or proves the wrong
// identity is skipped for a while (docs/semantics.md#outbound-skip-list).
import type { EventEmitter } from 'node:events'
import type { IncomingHttpHeaders } from 'node:http'
import type { Duplex } from 'node:stream'
import type { PeerCertificate } from 'node:tls'
import type { FastifyBaseLogger } from 'fastify'
import { Dispatcher, Pool, errors as undiciErrors, fetch as undiciFetch } from 'undici'
import type { RequestInit, Response } from 'undici'
import type { AgentClient } from './agent/client'
import { BlockingWatch } from './agent/watch'
import { AgentInvalidResponseError, InvalidOptionError, NoInstancesError, OutboundTimeoutError, PeerMismatchError } from './errors'
import { logEvent } from './log'
import { parseSpiffeId, parseSubjectAltNames } from './spiffe'
import type { DynamicTls, TlsMaterial } from './tls'

export interface OutboundOptions {
  /** `dc` of the discovery query (the peer's datacenter is not part of the identity check). */
  datacenter?: string
  /** Only instances whose checks all pass (`?passing`). Default true. */
  passingOnly?: boolean
  /** The same as `passingOnly` (its spelling in the outbound issue); giving both with different values is an error. */
  passing?: boolean
  /**
   * Namespace of the target (Consul Enterprise): sent as `ns` in discovery, and required in the
   * peer's SPIFFE ID. Default: the plugin's `namespace`; when neither is set, nothing is sent and
   * the ID must carry `default`.
   */
  namespace?: string
  /**
   * Admin partition of the target (Consul Enterprise): sent as `partition` in discovery, and
   * required in the peer's SPIFFE ID. Default: the plugin's `partition`, else `default`.
   */
  partition?: string
}

/** Per-call limits of `fetch()` (milliseconds). */
export interface OutboundTimeouts {
  /** Longest wait for the response headers once the request is sent; 0 disables. Default: undici's (300 000). */
  headersTimeout?: number
  /** Longest silence between two chunks of the response body; 0 disables. Default: undici's (300 000). */
  bodyTimeout?: number
  /**
   * Longest time for the whole call, discovery and body included; on expiry the call (or the body
   * being read) fails with FST_CONSUL_NATIVE_TIMEOUT. Default: none.
   */
  timeout?: number
}

export interface ServiceCallerDeps {
  client: AgentClient
  tls: DynamicTls
  /** Emits `'tls'` after new certificate material was installed in `tls`. */
  tlsEvents: EventEmitter
  log: FastifyBaseLogger
  /** Wait of each discovery poll, ms. */
  blockingWait: number
  /** The plugin's own namespace and partition: the defaults of every target. */
  namespace?: string | undefined
  partition?: string | undefined
}

export type OutboundFetchInit = RequestInit & OutboundOptions & OutboundTimeouts

/** An instance that refused or failed a connection is avoided for this long (unless none is left). */
export const FAILED_INSTANCE_MS = 10_000
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE'])
// Failures of the connection itself, before the request was written: safe to send elsewhere.
const CONNECT_ERRORS = new Set(['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'ETIMEDOUT', 'EADDRNOTAVAIL',
  'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_SOCKET'])
// OpenSSL's verdicts on a peer chain (Node's `err.code`): the instance is not one of the mesh's.
const UNTRUSTED_ERRORS = new Set(['UNABLE_TO_GET_ISSUER_CERT', 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'UNABLE_TO_DECRYPT_CERT_SIGNATURE', 'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE', 'CERT_NOT_YET_VALID', 'CERT_HAS_EXPIRED', 'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED', 'INVALID_CA', 'PATH_LENGTH_EXCEEDED', 'INVALID_PURPOSE', 'CERT_UNTRUSTED', 'CERT_REJECTED'])
const HOST_LABEL = /^[A-Za-z0-9-]{1,63}$/
const DEFAULT_SCOPE = 'default'

/** What the peer of an outbound connection must prove; `partition` defaults to `default`. */
export interface ExpectedPeer { service: string, namespace: string, partition?: string, trustDomain: string }

/**
 * The `checkServerIdentity` of every outbound connection: the peer certificate (already verified
 * against the roots) must carry exactly one URI SAN, unquoted, that is a service SPIFFE ID of the
 * trust domain, the partition, the namespace and the service expected. The datacenter is not
 * compared. Returns the error to fail the handshake with, or undefined.
 */
export function checkPeerIdentity (expected: ExpectedPeer, cert: Pick<PeerCertificate, 'subjectaltname'>): Error | undefined {
  const sans = parseSubjectAltNames(cert.subjectaltname)
  const uris = sans?.uris ?? []
  const uri = uris.length === 1 ? uris[0] as string : null
  const id = uri === null || sans?.quotedUris !== 0 ? null : parseSpiffeId(uri)
  // Consul writes partitions in lower case (docs/semantics.md#spiffe-ids); names keep their case.
  if (id?.kind === 'service' && id.trustDomain === expected.trustDomain.toLowerCase() &&
    id.partition.toLowerCase() === (expected.partition ?? DEFAULT_SCOPE).toLowerCase() &&
    id.namespace === expected.namespace && id.service === expected.service) return undefined
  return new PeerMismatchError(expected.service, uris.length === 0 ? 'none' : uris.join(' '))
}

/**
 * Where to dial an instance. `gatewayDatacenter`: set for a terminating gateway, which picks the
 * service by the SNI naming it in that datacenter (`serviceSni`).
 */
export interface Instance { readonly origin: string, readonly id: string, readonly gatewayDatacenter: string | null }

/**
 * The instances of a `/v1/health/connect` answer, reduced to where to dial them: `Service.Address`,
 * falling back to `Node.Address`, at `Service.Port`. An entry that cannot be dialled over TCP (one
 * registered with a `SocketPath` and no port, or a malformed one) is left out, not the whole
 * answer: one such instance must not hide the others. A terminating gateway's entry (Consul lists
 * those linked to the service) gets the SNI naming the service, in the gateway's datacenter.
 */
export function parseHealthConnect (body: unknown, path: string): Instance[] {
  if (!Array.isArray(body)) throw new AgentInvalidResponseError(path, 'expected an array')
  const instances: Instance[] = []
  for (const entry of body as Array<{ Node?: { Address?: unknown, Datacenter?: unknown }, Service?: { ID?: unknown, Kind?: unknown, Address?: unknown, Port?: unknown } } | null>) {
    const svc = entry?.Service
    const address = svc?.Address !== '' && svc?.Address !== undefined ? svc.Address : entry?.Node?.Address
    const port = svc?.Port
    if (typeof address !== 'string' || address === '' || !Number.isInteger(port) || (port as number) <= 0 || (port as number) > 65535) continue
    let gatewayDatacenter: string | null = null
    if (svc?.Kind === 'terminating-gateway') {
      const dc = entry?.Node?.Datacenter
      if (typeof dc !== 'string' || dc === '') continue
      gatewayDatacenter = dc
    }
    instances.push({ origin: `https://${address.includes(':') ? `[${address}]` : address}:${port as number}`, id: String(svc?.ID), gatewayDatacenter })
  }
  return instances
}

/** Consul's ServiceSNI (agent/connect/sni.go), without subsets. */
export function serviceSni (peer: ExpectedPeer, datacenter: string): string {
  const partition = peer.partition ?? DEFAULT_SCOPE
  return partition === DEFAULT_SCOPE
    ? `${peer.service}.${peer.namespace}.${datacenter}.internal.${peer.trustDomain}`
    : `${peer.service}.${peer.namespace}.${partition}.${datacenter}.internal-v1.${peer.trustDomain}`
}

/** `passingOnly`, or its alias `passing`; true unless one of them says false. */
function passingOnly (opts: OutboundOptions): boolean {
  const { passingOnly, passing } = opts
  if (passingOnly !== undefined && passing !== undefined && passingOnly !== passing) {
    throw new InvalidOptionError('passing', `and passingOnly (the same option) disagree: ${String(passing)} and ${String(passingOnly)}`)
  }
  return passingOnly ?? passing ?? true
}

/** Checks the per-call limits of fetch(): whole milliseconds; 0 disables the undici ones. */
function callLimits (headersTimeout: unknown, bodyTimeout: unknown, timeout: unknown): OutboundTimeouts {
  const check = (value: unknown, name: string, min: number): number | undefined => {
    if (value === undefined) return undefined
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
      throw new InvalidOptionError(name, `must be an integer number of milliseconds${min === 0 ? ' (0 disables it)' : ' above 0'}, got ${String(value)}`)
    }
    return value
  }
  return { headersTimeout: check(headersTimeout, 'headersTimeout', 0), bodyTimeout: check(bodyTimeout, 'bodyTimeout', 0), timeout: check(timeout, 'timeout', 1) }
}

/**
 * One fetch() call's view of a target: its requests carry the call's headers and body timeouts,
 * and its `timeout` runs from the call until the response is complete (a redirect's next request
 * gets what is left), so no timer outlives a finished call.
 */
class CallLimits extends Dispatcher {
  readonly #target: Dispatcher
  readonly #limits: OutboundTimeouts
  readonly #deadline: number | null
  readonly #expire: () => void
  #timer: NodeJS.Timeout | null = null
  readonly #settled = (): void => this.disarm()

  constructor (target: Dispatcher, limits: OutboundTimeouts, expire: () => void) {
    super()
    this.#target = target
    this.#limits = limits
    this.#expire = expire
    this.#deadline = limits.timeout === undefined ? null : Date.now() + limits.timeout
    this.#arm()
  }

  #arm (): void {
    if (this.#deadline === null || this.#timer !== null) return
    this.#timer = setTimeout(this.#expire, Math.max(0, this.#deadline - Date.now()))
    // A call never holds the process open by itself.
    this.#timer.unref()
  }

  disarm (): void {
    if (this.#timer !== null) clearTimeout(this.#timer)
    this.#timer = null
  }

  override dispatch (opts: Dispatcher.DispatchOptions, handler: Dispatcher.DispatchHandler): boolean {
    const { headersTimeout, bodyTimeout } = this.#limits
    this.#arm()
    return this.#target.dispatch({
      ...opts,
      ...(headersTimeout === undefined ? {} : { headersTimeout }),
      ...(bodyTimeout === undefined ? {} : { bodyTimeout })
    }, this.#deadline === null ? handler : settledHandler(handler, this.#settled))
  }
}

// The callbacks of both undici handler styles; those that end a request come first.
const FINAL_CALLBACKS = ['onComplete', 'onError', 'onUpgrade', 'onResponseEnd', 'onResponseError', 'onRequestUpgrade']
const HANDLER_CALLBACKS = [...FINAL_CALLBACKS, 'onConnect', 'onResponseStarted', 'onHeaders', 'onData', 'onBodySent', 'onRequestSent',
  'onRequestStart', 'onResponseStart', 'onResponseData']

/** Forwards every callback `handler` has, in its own style, and calls `settled` once the request ended. */
function settledHandler (handler: Dispatcher.DispatchHandler, settled: () => void): Dispatcher.DispatchHandler {
  const h = handler as Record<string, ((...args: any[]) => any) | undefined>
  const wrapped: Record<string, (...args: unknown[]) => unknown> = {}
  for (const name of HANDLER_CALLBACKS) {
    const callback = h[name]
    if (typeof callback !== 'function') continue
    wrapped[name] = FINAL_CALLBACKS.includes(name)
      ? (...args) => {
          settled()
          return callback.apply(handler, args)
        }
      : (...args) => callback.apply(handler, args)
  }
  return wrapped as unknown as Dispatcher.DispatchHandler
}

/** Whether two answers list different places to dial (an agent restarted without state may reuse an index). */
export function instancesDiffer (a: readonly Instance[], b: readonly Instance[]): boolean {
  return a.map((i) => i.origin).join() !== b.map((i) => i.origin).join()
}

type Handler = Dispatcher.DispatchHandler
type Controller = Dispatcher.DispatchController
type Headers = IncomingHttpHeaders

/** What an attempt reports to the dispatcher that made it. */
interface AttemptOwner {
  /** A failure before the request started; true when the owner took care of it (a retry elsewhere). */
  failedEarly (attempt: Attempt, err: Error): boolean
  /** The request started: its instance works. */
  started (attempt: Attempt): void
}

/**
 * One request sent to one instance. Forwards every callback to the caller's handler, and reports
 * a connection failure that happened before the request started. One object per request, with
 * plain methods in the handler's own style (undici has two; see `attemptOf`): no closure and no
 * argument array per request or callback.
 */
abstract class Attempt {
  #started = false
  constructor (readonly owner: AttemptOwner, readonly handler: Handler, readonly opts: Dispatcher.DispatchOptions,
    readonly instance: Instance, readonly isRetry: boolean, readonly alternatives: number) {}

  protected begin (): void {
    this.#started = true
    this.owner.started(this)
  }

  /** True when the failure was taken care of, and the caller's handler must not hear of it. */
  protected handledEarly (err: Error): boolean {
    return !this.#started && this.owner.failedEarly(this, err)
  }
}

/** The controller style (`onRequestStart` ... `onResponseError`). */
class ControllerAttempt extends Attempt {
  onRequestStart (controller: Controller, context: unknown): void {
    this.begin()
    this.handler.onRequestStart?.(controller, context)
  }

  onRequestUpgrade (controller: Controller, statusCode: number, headers: Headers, socket: Duplex): void {
    this.handler.onRequestUpgrade?.(controller, statusCode, headers, socket)
  }

  onResponseStart (controller: Controller, statusCode: number, headers: Headers, statusMessage?: string): void {
    this.handler.onResponseStart?.(controller, statusCode, headers, statusMessage)
  }

  onResponseData (controller: Controller, chunk: Buffer): void {
    this.handler.onResponseData?.(controller, chunk)
  }

  onResponseEnd (controller: Controller, trailers: Headers): void {
    this.handler.onResponseEnd?.(controller, trailers)
  }

  onResponseError (controller: Controller, err: Error): void {
    if (this.handledEarly(err)) return
    this.handler.onResponseError?.(controller, err)
  }
}

/** The callback style (`onConnect` ... `onComplete`, `onError`). */
class CallbackAttempt extends Attempt {
  onConnect (abort: (err?: Error) => void, context?: unknown): void {
    this.begin()
    ;(this.handler.onConnect as ((abort: (err?: Error) => void, context?: unknown) => void) | undefined)?.(abort, context)
  }

  onError (err: Error): void {
    if (this.handledEarly(err)) return
    this.handler.onError?.(err)
  }

  onUpgrade (statusCode: number, headers: Buffer[] | string[] | null, socket: Duplex): void {
    this.handler.onUpgrade?.(statusCode, headers, socket)
  }

  onResponseStarted (): void {
    this.handler.onResponseStarted?.()
  }

  onHeaders (statusCode: number, headers: Buffer[], resume: () => void, statusText: string): boolean | undefined {
    return this.handler.onHeaders?.(statusCode, headers, resume, statusText)
  }

  onData (chunk: Buffer): boolean | undefined {
    return this.handler.onData?.(chunk)
  }

  onComplete (trailers: string[] | null): void {
    this.handler.onComplete?.(trailers)
  }

  onBodySent (chunkSize: number, totalBytesSent: number): void {
    this.handler.onBodySent?.(chunkSize, totalBytesSent)
  }

  // Called by undici, though absent from its handler type.
  onRequestSent (): void {
    (this.handler as { onRequestSent?: () => void }).onRequestSent?.()
  }
}

/** The attempt in the caller's handler style. */
function attemptOf (owner: AttemptOwner, handler: Handler, opts: Dispatcher.DispatchOptions, instance: Instance,
  isRetry: boolean, alternatives: number): Attempt & Handler {
  return typeof handler.onRequestStart === 'function'
    ? new ControllerAttempt(owner, handler, opts, instance, isRetry, alternatives) as Attempt & Handler
    : new CallbackAttempt(owner, handler, opts, instance, isRetry, alternatives) as Attempt & Handler
}

/** Whether a request may be sent again elsewhere: an idempotent method, and a body that can be sent twice. */
function resendable (opts: Dispatcher.DispatchOptions): boolean {
  const body = opts.body
  return IDEMPOTENT.has(opts.method.toUpperCase()) &&
    (body === undefined || body === null || typeof body === 'string' || body instanceof Uint8Array)
}

function noop (): void {}

/** Fails a request that never reached a pool, in whichever handler style it uses. */
function failHandler (handler: Dispatcher.DispatchHandler, err: Error): void {
  if (typeof handler.onRequestStart === 'function') {
    const controller = { abort: noop, pause: noop, resume: noop, aborted: true, paused: false, reason: err }
    ;(handler.onResponseError as NonNullable<Dispatcher.DispatchHandler['onResponseError']>)(controller as unknown as Dispatcher.DispatchController, err)
  } else {
    ;(handler.onError as NonNullable<Dispatcher.DispatchHandler['onError']>)(err)
  }
}

/**
 * Sends each request to an instance of one service, round robin, over mTLS. The origin of the
 * request is ignored. Idempotent requests whose connection fails before anything was sent are
 * retried once on another instance.
 */
class ServiceDispatcher extends Dispatcher {
  readonly #service: string
  readonly #namespace: string
  readonly #partition: string
  readonly #deps: ServiceCallerDeps
  readonly #onClosed: () => void
  readonly #watch: BlockingWatch<Instance[]>
  readonly #pools = new Map<string, Pool>()
  readonly #failedAt = new Map<string, number>()
  #first: Promise<unknown> | null = null
  #next = 0
  #closed = false

  constructor (service: string, opts: ResolvedTarget, deps: ServiceCallerDeps, onClosed: () => void) {
    super()
    this.#service = service
    this.#namespace = opts.namespace ?? DEFAULT_SCOPE
    this.#partition = opts.partition ?? DEFAULT_SCOPE
    this.#deps = deps
    this.#onClosed = onClosed
    const path = `/v1/health/connect/${encodeURIComponent(service)}`
    // ns and partition only when configured: a CE agent refuses them (docs/semantics.md#scopes).
    const query = { passing: opts.passingOnly ? '' : undefined, dc: opts.datacenter, ns: opts.namespace, partition: opts.partition }
    this.#watch = new BlockingWatch<Instance[]>({
      name: `outbound:${service}`,
      waitMs: deps.blockingWait,
      log: deps.log,
      fetch: async (q) => {
        const res = await deps.client.request('GET', path, { query, blocking: { index: q.index, waitMs: q.waitMs }, signal: q.signal })
        return { index: res.index, value: parseHealthConnect(res.body, path) }
      },
      differs: instancesDiffer,
      accept: (list) => this.#prune(list)
    })
  }

  /** Closes the pools of instances that left. */
  #prune (list: Instance[]): void {
    const live = new Set(list.map((i) => i.origin))
    for (const origin of [...this.#pools.keys()]) {
      if (!live.has(origin)) this.#retire(origin)
    }
  }

  #retire (origin: string): void {
    const pool = this.#pools.get(origin) as Pool
    this.#pools.delete(origin)
    this.#failedAt.delete(origin)
    // close() lets requests in flight finish; it never rejects for a pool closed only once.
    Promise.allSettled([pool.close()]).then(noop, noop)
  }

  /** New certificate material: new connections must use it, so every pool is replaced. */
  rotate (): void {
    for (const origin of [...this.#pools.keys()]) this.#retire(origin)
  }

  /** The first discovery answer: resolves once known, rejects (with NoInstancesError) if the first poll fails. */
  #ready (): Promise<unknown> {
    if (this.#first === null) {
      const watch = this.#watch
      this.#first = new Promise((resolve, reject) => {
        // Once the first value is in, a later failure settles nothing: the promise is resolved.
        watch.onFailure((err) => reject(new NoInstancesError(this.#service, { cause: err })))
        watch.ready().then(resolve, reject)
      })
      watch.start()
    }
    return this.#first
  }

  override dispatch (opts: Dispatcher.DispatchOptions, handler: Dispatcher.DispatchHandler): boolean {
    if (this.#watch.value !== undefined) {
      this.#send(opts, handler, null)
    } else {
      // A throw in #send (bad options) must reach the handler, not become an unhandled rejection.
      this.#ready().then(() => this.#send(opts, handler, null)).catch((err: Error) => failHandler(handler, err))
    }
    return true
  }

  #send (opts: Dispatcher.DispatchOptions, handler: Dispatcher.DispatchHandler, exclude: string | null): void {
    const all = this.#watch.value as Instance[]
    const list = exclude === null ? all : all.filter((i) => i.origin !== exclude)
    const material = this.#deps.tls.material
    const problem = this.#closed
      ? new undiciErrors.ClientClosedError()
      : list.length === 0
        ? new NoInstancesError(this.#service)
        : material === null ? new TypeError('outbound mTLS needs certificate material; none is loaded yet') : null
    if (problem !== null) {
      failHandler(handler, problem)
      return
    }
    const pickFrom = this.#failedAt.size === 0 ? list : this.#healthy(list)
    const instance = pickFrom[this.#next++ % pickFrom.length] as Instance
    // Whether it may be resent is worked out only if its connection fails (failedEarly).
    const attempt = attemptOf(this.#attempts, handler, opts, instance, exclude !== null, list.length)
    this.#poolFor(instance, material as TlsMaterial).dispatch({ ...opts, origin: instance.origin }, attempt)
  }

  /** The dispatcher's side of its attempts, one object for all of them. */
  readonly #attempts: AttemptOwner = {
    failedEarly: (attempt, err) => {
      const { instance, opts, handler } = attempt
      const code = (err as { code?: string }).code as string
      const impostor = err instanceof PeerMismatchError || UNTRUSTED_ERRORS.has(code)
      if (!impostor && !CONNECT_ERRORS.has(code)) return false
      this.#failedAt.set(instance.origin, Date.now())
      if (impostor) {
        logEvent(this.#deps.log, 'warn', 'outbound-identity-refused', { service: this.#service, instance: instance.id }, `an instance of ${this.#service} did not prove its identity; skipping it for ${FAILED_INSTANCE_MS} ms`, err)
      }
      if (attempt.isRetry || attempt.alternatives < 2 || !resendable(opts)) return false
      logEvent(this.#deps.log, 'debug', 'outbound-retry', { service: this.#service, instance: instance.id }, 'outbound connection failed; retrying on another instance', err)
      this.#send(opts, handler, instance.origin)
      return true
    },
    // Connected: the instance works again, and the common path goes back to no filtering.
    started: (attempt) => { this.#failedAt.delete(attempt.instance.origin) }
  }

  /** The instances that did not fail to connect lately, or all of them when none is left. */
  #healthy (list: Instance[]): Instance[] {
    const now = Date.now()
    const healthy = list.filter((i) => !(now - (this.#failedAt.get(i.origin) ?? -Infinity) < FAILED_INSTANCE_MS))
    return healthy.length > 0 ? healthy : list
  }

  #poolFor (instance: Instance, material: TlsMaterial): Pool {
    const origin = instance.origin
    let pool = this.#pools.get(origin)
    if (pool === undefined) {
      const expected = { service: this.#service, namespace: this.#namespace, partition: this.#partition, trustDomain: material.trustDomain }
      pool = new Pool(origin, {
        allowH2: true,
        connect: {
          key: material.keyPem,
          cert: material.certPem,
          ca: [...material.rootPems],
          minVersion: 'TLSv1.2',
          rejectUnauthorized: true,
          // Node checks the server's identity only on a full handshake: a resumed session would
          // skip checkPeerIdentity, so none is resumed (mesh connections are kept alive anyway).
          maxCachedSessions: 0,
          ...(instance.gatewayDatacenter === null ? null : { servername: serviceSni(expected, instance.gatewayDatacenter) }),
          checkServerIdentity: (_host: string, cert: PeerCertificate) => checkPeerIdentity(expected, cert)
        }
      })
      this.#pools.set(origin, pool)
    }
    return pool
  }

  /** Stops discovery and closes the pools gracefully (`close`) or at once (`destroy`); later requests fail. */
  #shutdown (how: 'close' | 'destroy', callback: (() => void) | undefined): Promise<void> | undefined {
    this.#closed = true
    // Out of the cache at once: the next dispatcher() for this target builds a new one.
    this.#onClosed()
    this.#watch.stop()
    const pools = [...this.#pools.values()]
    this.#pools.clear()
    const done = Promise.all(pools.map(async (pool) => await pool[how]())).then(noop)
    if (callback === undefined) return done
    done.then(callback, noop)
    return undefined
  }

  override close (): Promise<void>
  override close (callback: () => void): void
  override close (callback?: () => void): Promise<void> | undefined {
    return this.#shutdown('close', callback)
  }

  override destroy (): Promise<void>
  override destroy (err: Error | null): Promise<void>
  override destroy (callback: () => void): void
  override destroy (err: Error | null, callback: () => void): void
  override destroy (...args: unknown[]): Promise<void> | undefined {
    const callback = args.find((a) => typeof a === 'function') as (() => void) | undefined
    return this.#shutdown('destroy', callback)
  }
}

type ResolvedTarget = Required<Pick<OutboundOptions, 'passingOnly'>> & Omit<OutboundOptions, 'passing'>

/** Calls other mesh services over mTLS: `dispatcher(service)` for any undici API, `fetch(service, path)`. */
export class ServiceCaller {
  readonly #deps: ServiceCallerDeps
  readonly #dispatchers = new Map<string, ServiceDispatcher>()
  readonly #onTls = (): void => {
    for (const d of this.#dispatchers.values()) d.rotate()
  }

  #closed = false

  constructor (deps: ServiceCallerDeps) {
    this.#deps = deps
    deps.tlsEvents.on('tls', this.#onTls)
  }

  /**
   * An undici Dispatcher for `service`: each request goes to one of its current mesh instances
   * (the URL's origin is ignored). Cached per service, datacenter, namespace and `passingOnly`.
   */
  dispatcher (service: string, opts: OutboundOptions = {}): Dispatcher {
    if (this.#closed) throw new undiciErrors.ClientClosedError()
    const resolved: ResolvedTarget = {
      datacenter: opts.datacenter,
      passingOnly: passingOnly(opts),
      namespace: opts.namespace ?? this.#deps.namespace,
      partition: opts.partition ?? this.#deps.partition
    }
    const key = JSON.stringify([service, resolved.datacenter, resolved.namespace, resolved.partition, resolved.passingOnly])
    let d = this.#dispatchers.get(key)
    if (d === undefined) {
      const created: ServiceDispatcher = new ServiceDispatcher(service, resolved, this.#deps, () => {
        if (this.#dispatchers.get(key) === created) this.#dispatchers.delete(key)
      })
      d = created
      this.#dispatchers.set(key, d)
    }
    return d
  }

  /**
   * undici `fetch` to `path` on an instance of `service` (the URL is
   * `https://<service>.service.consul<path>`; the host is cosmetic). Rejects with NoInstancesError
   * or PeerMismatchError themselves rather than fetch's `TypeError: fetch failed`, and with
   * OutboundTimeoutError when `timeout` or `headersTimeout` expires (docs/semantics.md#outbound-timeouts).
   */
  async fetch (service: string, path: string, init: OutboundFetchInit = {}): Promise<Response> {
    const { datacenter, passingOnly, passing, namespace, partition, headersTimeout, bodyTimeout, timeout, ...rest } = init
    const limits = callLimits(headersTimeout, bodyTimeout, timeout)
    const target = this.dispatcher(service, { datacenter, passingOnly, passing, namespace, partition })
    let signal = rest.signal
    let dispatcher: Dispatcher = target
    let call: CallLimits | null = null
    if (timeout !== undefined) {
      const expiry = new AbortController()
      // The reason is the error fetch rejects with, and the one a body being read fails with.
      call = new CallLimits(target, limits, () => expiry.abort(new OutboundTimeoutError(service, `not complete within ${timeout} ms`)))
      signal = signal === undefined || signal === null ? expiry.signal : AbortSignal.any([signal, expiry.signal])
    } else if (headersTimeout !== undefined || bodyTimeout !== undefined) {
      call = new CallLimits(target, limits, noop)
    }
    if (call !== null) dispatcher = call
    const host = HOST_LABEL.test(service) ? `${service}.service.consul` : 'service.consul'
    try {
      return await undiciFetch(new URL(path, `https://${host}`), { ...rest, signal, dispatcher })
    } catch (err) {
      call?.disarm()
      const cause = (err as { cause?: unknown }).cause
      if (cause instanceof NoInstancesError || cause instanceof PeerMismatchError) throw cause
      if ((cause as { code?: unknown } | undefined)?.code === 'UND_ERR_HEADERS_TIMEOUT') {
        throw new OutboundTimeoutError(service, `no response headers within ${limits.headersTimeout as number} ms`, { cause })
      }
      throw err
    }
  }

  /** Stops every discovery watch and closes every pool (requests in flight finish). */
  async close (): Promise<void> {
    this.#closed = true
    this.#deps.tlsEvents.off('tls', this.#onTls)
    const all = [...this.#dispatchers.values()]
    this.#dispatchers.clear()
    await Promise.all(all.map(async (d) => await d.close()))
  }
}
