// Registers the app with the local agent as a Connect-native service (docs/semantics.md#registration) and keeps it
// registered: an anti-entropy loop blocks on the agent's view of the instance (docs/semantics.md#hash-blocking)
// and registers again when the agent has lost it (an agent restarted without its state), and a
// TTL check, when chosen, is kept passing. The loops never throw: failures are logged once per
// cause and retried with backoff; every timer is unref()'d and stop() aborts what is in flight.
import * as os from 'node:os'
import * as net from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import type { AddressInfo } from 'node:net'
import type { FastifyBaseLogger, FastifyInstance } from 'fastify'
import type { AgentClient, AgentResponse } from './agent/client'
import { agentStatusOf, clampWait } from './agent/client'
import { InvalidOptionError, RegisterFailedError } from './errors'
import { extendListen, holdListening } from './fastify-internals'
import { logEvent } from './log'
import type { ConsulSync } from './sync'
import { formatDurationUs, parseDurationUs } from './go-duration'

// Agent endpoints take the Enterprise namespace and partition (sent only when configured, as a
// CE agent refuses them); the datacenter does not apply to the local agent's own services.
const AGENT_SCOPES = ['ns', 'partition'] as const

/** The `register` option: how the instance appears in Consul. */
export interface RegisterOptions {
  /** Instance ID. Default `${service}-${os.hostname()}-${port}`. */
  id?: string
  /**
   * Address other services dial. Default: the listening address; for a wildcard listener
   * (`0.0.0.0`, `::`, which Consul refuses) the first non-internal IPv4 address, else `127.0.0.1`.
   */
  address?: string
  /** Default: the listening port. */
  port?: number
  tags?: string[]
  meta?: Record<string, string>
  /** Health check the agent runs. Default `'https'` (GET on the health route, without a client certificate). */
  check?: 'https' | 'tcp' | 'ttl' | false
  /** Go duration. Default `10s`; a TTL check's TTL is three times this, and it is renewed every interval. */
  checkInterval?: string
  /** Go duration. Default `2s`. */
  checkTimeout?: string
  /** Go duration. Default `1m` (Consul's minimum). */
  deregisterCriticalServiceAfter?: string
  /** Server name sent (SNI) by the `https` check. Default: none; the check skips verification anyway. */
  tlsServerName?: string
}

export interface ResolvedRegistration {
  /** The exact body of `PUT /v1/agent/service/register`. */
  readonly body: Record<string, unknown>
  readonly id: string
  /** `${id}-health`, or null without a check. */
  readonly checkId: string | null
  /** The TTL of a `ttl` check (3 × interval); null for other kinds. Renewed every `ttlMs / 3`. */
  readonly ttlMs: number | null
  readonly service: string
  /** The check interval (also when `check` is false), which paces anti-entropy. */
  readonly intervalMs: number
}

export interface ServiceRegistrationOptions {
  /** Wait of each anti-entropy poll. Default: the check interval, at least 1 s. */
  antiEntropyWaitMs?: number
  /** Delay before a restore that follows another one, doubling each time. Default 1 min → 30 min. */
  restoreBackoff?: { initialMs: number, maxMs: number }
}

export interface RegistrationState {
  /** The agent held the registration at the last look. */
  registered: boolean
  /** When the agent last accepted the registration (ISO 8601). */
  lastRegistered: string | null
  /** How often a lost registration was restored. */
  restored: number
  /** The current problem, null once every loop is healthy again. */
  lastError: string | null
}

/** What buildRegistration reads from the machine (injectable for tests). */
export interface RegistrationSystem {
  hostname: () => string
  networkInterfaces: () => NodeJS.Dict<os.NetworkInterfaceInfo[]>
}

const DEFAULTS = { check: 'https', checkInterval: '10s', checkTimeout: '2s', deregisterCriticalServiceAfter: '1m' } as const
const CHECK_KINDS = new Set<unknown>(['https', 'tcp', 'ttl', false])
// Consul refuses these as a service address (400 "Invalid service address").
const UNSPECIFIED = new Set(['0.0.0.0', '::', '0:0:0:0:0:0:0:0'])
const FALLBACK_ADDRESS = '127.0.0.1'
const MAX_DURATION_US = 365 * 24 * 3_600_000_000
const MIN_ANTI_ENTROPY_WAIT_MS = 1_000
const BACKOFF = { initialMs: 200, maxMs: 30_000 }
// An agent that removes the instance again and again (its reaper, once the check stayed critical
// for DeregisterCriticalServiceAfter) is not fought every cycle: restores space out.
const RESTORE_BACKOFF = { initialMs: 60_000, maxMs: 30 * 60_000 }
const ID = /^[^\s/\p{Cc}]+$/u
const HOST = /^[^\s/\p{Cc}[\]]+$/u
// validateMetadata in Consul's agent/structs: keys, sizes, and the reserved prefix.
const META_KEY = /^[A-Za-z0-9_-]{1,128}$/
const MAX_META_PAIRS = 64
const MAX_META_VALUE = 512

function fail (name: string, reason: string): never {
  throw new InvalidOptionError(name, reason)
}

function shown (v: unknown): string {
  if (typeof v === 'object' && v !== null) return Array.isArray(v) ? 'an array' : 'an object'
  return typeof v === 'string' ? JSON.stringify(v) : String(v)
}

function isPlainObject (v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

function unbracket (address: string): string {
  return /^\[(.*)\]$/.exec(address)?.[1] ?? address
}

/** `host:port`, with an IPv6 address in brackets. */
function hostPort (address: string, port: number): string {
  return net.isIPv6(address) ? `[${address}]:${port}` : `${address}:${port}`
}

type Validator = (value: unknown, name: string) => unknown

function duration (value: unknown, name: string): string {
  const us = typeof value === 'string' ? parseDurationUs(value) : null
  if (us === null || us <= 0 || us > MAX_DURATION_US) {
    fail(name, `must be a positive Go duration of at most 8760h, such as "10s" or "1m30s", got ${shown(value)}`)
  }
  return value as string
}

const FIELDS: Record<keyof RegisterOptions, Validator> = {
  id: (v, name) => {
    if (typeof v !== 'string' || !ID.test(v)) fail(name, `must be a non-empty string without spaces or "/", got ${shown(v)}`)
    return v
  },
  address: (v, name) => {
    const address = typeof v === 'string' ? unbracket(v) : ''
    if (!HOST.test(address)) fail(name, `must be the IP address or host name other services reach this instance at, got ${shown(v)}`)
    if (UNSPECIFIED.has(address)) fail(name, `Consul refuses the unspecified address ${shown(v)}: give a reachable address, or leave it out to use the listening one`)
    return address
  },
  port: (v, name) => {
    if (!Number.isInteger(v) || (v as number) < 1 || (v as number) > 65535) fail(name, `must be an integer from 1 to 65535, got ${shown(v)}`)
    return v
  },
  tags: (v, name) => {
    if (!Array.isArray(v) || !v.every((tag) => typeof tag === 'string')) fail(name, `must be an array of strings, got ${shown(v)}`)
    return [...v]
  },
  meta: (v, name) => {
    if (!isPlainObject(v)) fail(name, `must be an object of string values, got ${shown(v)}`)
    const entries = Object.entries(v)
    if (entries.length > MAX_META_PAIRS) fail(name, `may hold at most ${MAX_META_PAIRS} pairs, got ${entries.length}`)
    for (const [key, value] of entries) {
      if (!META_KEY.test(key)) fail(`${name}.${key}`, 'keys must be 1 to 128 letters, digits, "_" or "-"')
      if (key.startsWith('consul-')) fail(`${name}.${key}`, 'the "consul-" prefix is reserved by Consul')
      // Consul counts bytes (Go's len of a UTF-8 string).
      if (typeof value !== 'string' || Buffer.byteLength(value) > MAX_META_VALUE) fail(`${name}.${key}`, `must be a string of at most ${MAX_META_VALUE} bytes (UTF-8), got ${shown(value)}`)
    }
    return Object.fromEntries(entries)
  },
  check: (v, name) => {
    if (!CHECK_KINDS.has(v)) fail(name, `must be 'https', 'tcp', 'ttl' or false, got ${shown(v)}`)
    return v
  },
  checkInterval: duration,
  checkTimeout: duration,
  deregisterCriticalServiceAfter: duration,
  tlsServerName: (v, name) => {
    if (typeof v !== 'string' || !HOST.test(v)) fail(name, `must be a host name, got ${shown(v)}`)
    return v
  }
}

function validateFields (raw: Record<string, unknown>): RegisterOptions {
  const out: Record<string, unknown> = {}
  for (const [key, value] of Object.entries(raw)) {
    if (!Object.hasOwn(FIELDS, key)) fail(`register.${key}`, `is not an option (known: ${Object.keys(FIELDS).join(', ')})`)
    if (value !== undefined) out[key] = FIELDS[key as keyof RegisterOptions](value, `register.${key}`)
  }
  return out as RegisterOptions
}

/** The plugin's `register` option: `false`/absent → null (do not register), `true` → defaults, or an object. */
export function validateRegisterOption (value: unknown): RegisterOptions | null {
  if (value === undefined || value === false) return null
  if (value === true) return {}
  if (!isPlainObject(value)) fail('register', `must be true, false or an object such as { tags: ['v1'] }, got ${shown(value)}`)
  return validateFields(value)
}

/** The first non-internal IPv4 address, else loopback: what a wildcard listener is reached at. */
function advertisedAddress (listening: string, system: RegistrationSystem): string {
  const address = unbracket(listening)
  if (!UNSPECIFIED.has(address)) return address
  for (const list of Object.values(system.networkInterfaces())) {
    for (const info of list ?? []) {
      if (info.family === 'IPv4' && !info.internal) return info.address
    }
  }
  return FALLBACK_ADDRESS
}

/**
 * The registration for `service` listening at `listening`, from options validateRegisterOption()
 * accepted. `healthUrl` is the path of the health route (null when it is disabled; resolveOptions
 * refuses that with an `https` check), which the `https` check requests.
 */
export function buildRegistration (service: string, o: RegisterOptions, listening: { address: string, port: number },
  healthUrl: string | null, system: RegistrationSystem = os): ResolvedRegistration {
  const port = o.port ?? listening.port
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    fail('register.port', `the server listens on no TCP port (${shown(port)}): set register.port`)
  }
  const address = o.address ?? advertisedAddress(listening.address, system)
  const id = o.id ?? `${service}-${system.hostname()}-${port}`
  const kind = o.check ?? DEFAULTS.check
  const interval = o.checkInterval ?? DEFAULTS.checkInterval
  const intervalUs = parseDurationUs(interval) as number
  const deregisterAfter = o.deregisterCriticalServiceAfter ?? DEFAULTS.deregisterCriticalServiceAfter
  const timing = { Interval: interval, Timeout: o.checkTimeout ?? DEFAULTS.checkTimeout, DeregisterCriticalServiceAfter: deregisterAfter }
  const checkId = `${id}-health`
  const named = { CheckID: checkId, Name: `${service} health` }

  let check: Record<string, unknown> | null = null
  if (kind === 'https') {
    check = {
      ...named,
      HTTP: `https://${hostPort(address, port)}${healthUrl as string}`,
      TLSSkipVerify: true,
      ...(o.tlsServerName === undefined ? {} : { TLSServerName: o.tlsServerName }),
      ...timing
    }
  } else if (kind === 'tcp') {
    check = { ...named, TCP: hostPort(address, port), ...timing }
  } else if (kind === 'ttl') {
    check = { ...named, TTL: formatDurationUs(3 * intervalUs), Status: 'passing', DeregisterCriticalServiceAfter: deregisterAfter }
  }

  const body: Record<string, unknown> = {
    ID: id,
    Name: service,
    Address: address,
    Port: port,
    Tags: o.tags ?? [],
    Meta: o.meta ?? {},
    Connect: { Native: true },
    ...(check === null ? {} : { Check: check })
  }
  return Object.freeze({
    body,
    id,
    checkId: check === null ? null : checkId,
    ttlMs: kind === 'ttl' ? 3 * intervalUs / 1_000 : null,
    service,
    intervalMs: intervalUs / 1_000
  })
}

type Loop = 'anti-entropy' | 'ttl'

const LOOP_EVENTS: Record<Loop, { event: 'registration-check-failed' | 'ttl-update-failed', msg: string }> = {
  'anti-entropy': { event: 'registration-check-failed', msg: 'cannot confirm the service registration with the agent; retrying' },
  ttl: { event: 'ttl-update-failed', msg: 'cannot mark the TTL check passing; retrying' }
}

const noop = (): void => {}

/** Consul's own words: the client's AgentResponseError prefixes them with the request and status. */
function consulMessage (err: unknown): string {
  return (err as Error).message.replace(/^Consul agent answered \S+ \S+ with \d+: /, '')
}

/** Errors that retrying will not fix: a 4xx other than 404/429 (e.g. an ACL token without service:write). */
function needsOperator (err: unknown): boolean {
  const status = agentStatusOf(err) ?? agentStatusOf((err as Error).cause)
  return status !== null && status >= 400 && status < 500 && status !== 404 && status !== 429
}

/**
 * One registration with the local agent. Call register() once the server listens, then start();
 * deregister() before the server and the agent client close.
 */
export class ServiceRegistration {
  readonly #client: AgentClient
  readonly #registration: ResolvedRegistration
  readonly #log: FastifyBaseLogger
  readonly #waitMs: number
  readonly #restoreBackoff: { initialMs: number, maxMs: number }
  readonly #stop = new AbortController()
  readonly #state: RegistrationState = { registered: false, lastRegistered: null, restored: 0, lastError: null }
  /** Per loop, the cause last logged at warn/error; repeats go to debug. */
  readonly #logged = new Map<Loop, string>()
  #started = false
  #everRegistered = false
  /** A registration was sent and its fate is unknown (no answer, or the client gave up waiting). */
  #maybeRegistered = false
  /** The first registration, while in flight: deregister() waits for it. */
  #registering: Promise<void> | null = null
  #loops: Promise<void> = Promise.resolve()
  #deregistering: Promise<void> | null = null

  constructor (client: AgentClient, registration: ResolvedRegistration, log: FastifyBaseLogger, opts: ServiceRegistrationOptions = {}) {
    this.#client = client
    this.#registration = registration
    this.#log = log
    this.#waitMs = clampWait(opts.antiEntropyWaitMs ?? Math.max(MIN_ANTI_ENTROPY_WAIT_MS, registration.intervalMs))
    this.#restoreBackoff = opts.restoreBackoff ?? RESTORE_BACKOFF
  }

  /** The instance ID registered. */
  get id (): string {
    return this.#registration.id
  }

  get state (): RegistrationState {
    return { ...this.#state }
  }

  /** `PUT /v1/agent/service/register?replace-existing-checks=true`; throws RegisterFailedError. */
  async register (): Promise<void> {
    const put = this.#put(undefined)
    this.#registering = put.then(noop, noop)
    try {
      await put
    } catch (err) {
      this.#state.lastError = (err as Error).message
      throw err
    } finally {
      this.#registering = null
    }
    const r = this.#registration
    logEvent(this.#log, 'info', 'registered', { serviceId: r.id, address: r.body.Address, port: r.body.Port, checkId: r.checkId }, `registered service ${r.service} as ${r.id}`)
  }

  /** Starts anti-entropy (and the TTL renewal of a `ttl` check). Never throws; idempotent; a no-op once stopped. */
  start (): void {
    const signal = this.#stop.signal
    if (this.#started || signal.aborted) return
    this.#started = true
    const loops = [this.#antiEntropy(signal)]
    const r = this.#registration
    if (r.checkId !== null && r.ttlMs !== null) loops.push(this.#keepPassing(signal, r.checkId, r.ttlMs / 3))
    this.#loops = Promise.all(loops).then(noop, (err: unknown) => {
      // Only a throwing logger gets here: stop rather than spin, and keep the error visible.
      this.#state.lastError = (err as Error).message
      this.stop()
    })
  }

  /** Stops the loops, then `PUT /v1/agent/service/deregister/<id>`. Logs failures, never throws; idempotent. */
  deregister (): Promise<void> {
    this.#deregistering ??= this.#deregister()
    return this.#deregistering
  }

  /** Stops the loops without deregistering. */
  stop (): void {
    this.#stop.abort()
  }

  async #deregister (): Promise<void> {
    this.stop()
    // A registration in flight (close() while listen() registers) must not land after the
    // deregistration: wait for its answer (docs/semantics.md#registration-close). So must a restore.
    if (this.#registering !== null) {
      logEvent(this.#log, 'debug', 'deregister-after-registration', { serviceId: this.#registration.id }, 'closing while the registration is in flight; deregistering once the agent answers')
      await this.#registering
    }
    await this.#loops
    if (!this.#everRegistered && !this.#maybeRegistered) return
    const id = this.#registration.id
    try {
      const res = await this.#client.request('PUT', `/v1/agent/service/deregister/${encodeURIComponent(id)}`, { allow404: true, scoped: AGENT_SCOPES })
      this.#state.registered = false
      logEvent(this.#log, 'info', 'deregistered', { serviceId: id, alreadyGone: res.status === 404 }, `deregistered ${id}`)
    } catch (err) {
      this.#state.lastError = (err as Error).message
      logEvent(this.#log, operatorLevel(err), 'deregister-failed', { serviceId: id },
        `cannot deregister ${id}; the agent removes it once its check stays critical`, err)
    }
  }

  async #put (signal: AbortSignal | undefined): Promise<void> {
    const r = this.#registration
    try {
      await this.#client.request('PUT', '/v1/agent/service/register', { query: { 'replace-existing-checks': 'true' }, body: r.body, signal, scoped: AGENT_SCOPES })
    } catch (err) {
      // Without an answer (timeout, lost connection), the agent may have registered it all the same.
      if (agentStatusOf(err) === null) this.#maybeRegistered = true
      throw new RegisterFailedError(r.service, consulMessage(err), { cause: err })
    }
    this.#everRegistered = true
    this.#state.registered = true
    this.#state.lastRegistered = new Date().toISOString()
  }

  /**
   * Blocks on `GET /v1/agent/service/<id>` (hash + wait); a 404 means the agent lost the
   * registration, which is then restored. The wait bounds how long a loss can go unnoticed.
   */
  async #antiEntropy (signal: AbortSignal): Promise<void> {
    const path = `/v1/agent/service/${encodeURIComponent(this.#registration.id)}`
    const waitMs = this.#waitMs
    let hash: string | null = null
    let failures = 0
    /** Restores in the current streak: each within twice the longest backoff of the one before. */
    let restores = 0
    let lastRestoreAt = -Infinity
    /** The last look got no answer (the agent was down). */
    let unanswered = false
    while (!signal.aborted) {
      let delayMs = 0
      try {
        let res: AgentResponse<unknown>
        try {
          res = await this.#client.request('GET', path, {
            signal, allow404: true, blocking: hash === null ? undefined : { hash, waitMs }, scoped: AGENT_SCOPES
          })
        } catch (err) {
          // No answer at all (refused, reset, timed out), as while an agent restarts; an agent
          // answering with an error status is up.
          unanswered = agentStatusOf(err) === null
          throw err
        }
        const afterOutage = unanswered
        unanswered = false
        hash = res.contentHash
        if (res.status === 404) {
          this.#state.registered = false
          const backoff = this.#restoreBackoff
          // A loss long after the last restore, or found once the agent answers again (it restarted
          // without its state), is no reaper at work: a new streak, restored at once.
          if (afterOutage || performance.now() - lastRestoreAt > 2 * backoff.maxMs) restores = 0
          if (restores > 0) {
            await sleep(backoffCeiling(restores, backoff), undefined, { signal, ref: false }).catch(noop)
            if (signal.aborted) return
          }
          await this.#restore(restores > 0)
          restores++
          lastRestoreAt = performance.now()
        } else if (hash === null) {
          // No hash to block on: poll at the wait instead of spinning.
          delayMs = waitMs
        }
        failures = 0
        this.#recovered('anti-entropy')
      } catch (err) {
        if (signal.aborted) return
        failures++
        hash = null
        delayMs = retryIn(failures, Math.min(BACKOFF.maxMs, waitMs))
        this.#failed('anti-entropy', err, delayMs)
      }
      await sleep(delayMs, undefined, { signal, ref: false }).catch(noop)
    }
  }

  /**
   * Registers again. Not cancelled by stop(): an aborted PUT may still land on the agent, after the
   * deregistration; deregister() waits for it instead (docs/semantics.md#registration-close).
   */
  async #restore (again: boolean): Promise<void> {
    const lost = this.#everRegistered
    this.#state.registered = false
    await this.#put(undefined)
    const r = this.#registration
    if (lost) {
      this.#state.restored++
      // Once per streak at warn: an agent that keeps removing it is said once (then debug).
      logEvent(this.#log, again ? 'debug' : 'warn', 'registration-restored', { serviceId: r.id }, `the agent had lost service ${r.id}; registered it again`)
    } else {
      logEvent(this.#log, 'info', 'registered', { serviceId: r.id }, `registered service ${r.service} as ${r.id}`)
    }
  }

  /** `PUT /v1/agent/check/pass/<checkId>` every period (a third of the TTL), sooner after a failure. */
  async #keepPassing (signal: AbortSignal, checkId: string, periodMs: number): Promise<void> {
    const path = `/v1/agent/check/pass/${encodeURIComponent(checkId)}`
    let failures = 0
    let delayMs = periodMs
    for (;;) {
      await sleep(delayMs, undefined, { signal, ref: false }).catch(noop)
      if (signal.aborted) return
      try {
        await this.#client.request('PUT', path, { signal, scoped: AGENT_SCOPES })
        failures = 0
        delayMs = periodMs
        this.#recovered('ttl')
      } catch (err) {
        if (signal.aborted) return
        failures++
        delayMs = retryIn(failures, periodMs)
        this.#failed('ttl', err, delayMs)
      }
    }
  }

  #failed (loop: Loop, err: unknown, retryInMs: number): void {
    const message = (err as Error).message
    this.#state.lastError = message
    const { event, msg } = LOOP_EVENTS[loop]
    const fields = { serviceId: this.#registration.id, retryInMs }
    if (this.#logged.get(loop) === message) {
      logEvent(this.#log, 'debug', event, fields, `${msg} (failed again)`, err)
      return
    }
    this.#logged.set(loop, message)
    logEvent(this.#log, operatorLevel(err), event, fields, msg, err)
  }

  #recovered (loop: Loop): void {
    if (this.#logged.delete(loop)) {
      logEvent(this.#log, 'info', 'registration-recovered', { loop, serviceId: this.#registration.id }, `${loop} with the agent works again`)
    }
    if (this.#logged.size === 0) this.#state.lastError = null
  }
}

/** At error when an operator must act (retrying will not help), else at warn. */
function operatorLevel (err: unknown): 'error' | 'warn' {
  return needsOperator(err) ? 'error' : 'warn'
}

/** Full-jitter exponential backoff, capped at `maxMs`. */
function retryIn (failures: number, maxMs: number): number {
  return Math.max(1, Math.floor(Math.random() * backoffCeiling(failures, { initialMs: BACKOFF.initialMs, maxMs })))
}

/** `initialMs` doubled for each attempt after the first, capped at `maxMs`. */
function backoffCeiling (attempt: number, backoff: { initialMs: number, maxMs: number }): number {
  return Math.min(backoff.maxMs, backoff.initialMs * 2 ** Math.min(attempt - 1, 30))
}

/** What the plugin's `register` option needs to register the instance it runs in. */
export interface RegistrationWiring {
  readonly client: AgentClient
  readonly sync: ConsulSync
  readonly service: string
  readonly options: RegisterOptions
  /** The health route's path, null when it is disabled. */
  readonly healthUrl: string | null
  readonly log: FastifyBaseLogger
}

/**
 * Option `register`: registers the instance after the server listens (its address is known then),
 * a failure failing listen(); on close, the instance leaves the catalog before connections drain.
 */
export function registerOnListen (fastify: FastifyInstance, wiring: RegistrationWiring): void {
  const { client, sync, service, options, healthUrl, log } = wiring
  const registerInstance = async (): Promise<void> => {
    const { address, port } = fastify.server.address() as AddressInfo
    const registration = new ServiceRegistration(client, buildRegistration(service, options, { address, port }, healthUrl), log)
    // Known before the PUT is sent, so that a close() meanwhile deregisters it (docs/semantics.md#registration-close).
    sync.registration = registration
    try {
      await registration.register()
    } catch (err) {
      logEvent(log, 'error', 'register-failed', null, 'could not register the instance: listen() fails', err as Error)
      throw err
    }
    registration.start()
  }
  // Fastify's onListen hook cannot fail listen(), so listen() itself is extended (register() awaited
  // before listen())...
  let viaListen = false
  extendListen(fastify, registerInstance, () => { viaListen = true })
  // ...or, for a listen() already running when the plugin loads, the server's 'listening' event
  // waits for the registration, whose refusal becomes the error listen() rejects with.
  holdListening(fastify.server, () => viaListen, registerInstance, () => {
    fastify.close().catch(/* c8 ignore next -- the app's own onClose hooks failing: nothing more to do */ () => {})
  })
  fastify.addHook('preClose', async function consulNativeDeregister () {
    await sync.registration?.deregister()
  })
}
