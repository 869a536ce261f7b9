// An in-memory stand-in for AgentClient, for unit tests of ConsulSync: each endpoint holds one
// value at one index and answers polls the way a blocking query does (at once when the caller's
// index is older, otherwise when the value changes), fails on demand, and ends a held poll when
// its signal aborts. Tests wait on the polls themselves (`nextPoll()`), never on time.
import type { FastifyBaseLogger } from 'fastify'
import type { AgentClient, AgentResponse, BlockingQuery } from '../../lib/agent/client'
import type { AgentSelfView, ConfigEntryKind, ConfigEntryViews } from '../../lib/agent/parse'
import type { IndexedCARoots, Intention, IssuedCert } from '../../lib/agent/wire'
import type { DevCertificateAuthority, SignedLeaf } from '../../lib/dev-agent/ca'

/** One poll as the watch made it. */
export interface Poll {
  readonly index: number
  readonly signal: AbortSignal | undefined
}

interface Held<T> {
  readonly poll: Poll
  readonly resolve: (res: AgentResponse<T>) => void
  readonly reject: (err: unknown) => void
}

export function response<T> (body: T, index: number | null, defaultAclPolicy: 'allow' | 'deny' | null = null): AgentResponse<T> {
  return { status: 200, index, contentHash: null, defaultAclPolicy, knownLeader: true, body }
}

export class FakeEndpoint<T> {
  readonly name: string
  readonly polls: Poll[] = []
  /** Polls ended by their signal (stop()) while held. */
  aborted = 0
  /** The X-Consul-Default-ACL-Policy header of this endpoint's answers. */
  defaultAclPolicy: 'allow' | 'deny' | null = null
  #current: { body: T, index: number } | null = null
  #error: Error | null = null
  readonly #held = new Set<Held<T>>()
  readonly #waiters: Array<{ count: number, resolve: (poll: Poll) => void }> = []

  constructor (name: string) {
    this.name = name
  }

  /** Polls held open: waiting for a change, or for an answer that was never given. */
  get held (): number {
    return this.#held.size
  }

  /** Makes `body` the value at `index`, answers every held poll older than it, and ends a failure. */
  set (body: T, index: number): void {
    this.#current = { body, index }
    this.#error = null
    for (const held of [...this.#held]) {
      if (held.poll.index < index) {
        this.#held.delete(held)
        held.resolve(response(body, index, this.defaultAclPolicy))
      }
    }
  }

  /** Back to no answer at all: every later poll is held until set() or fail(). */
  forget (): void {
    this.#current = null
    this.#error = null
  }

  /** Fails every held poll, and every later one until the next set(). */
  fail (err: Error): void {
    this.#error = err
    for (const held of [...this.#held]) {
      this.#held.delete(held)
      held.reject(err)
    }
  }

  /** Resolves with poll number `count` (1-based) once it has been made. */
  poll (count: number): Promise<Poll> {
    const made = this.polls[count - 1]
    if (made !== undefined) return Promise.resolve(made)
    return new Promise((resolve) => this.#waiters.push({ count, resolve }))
  }

  /** Resolves with the first poll made after this call: the previous answer has then been handled. */
  nextPoll (): Promise<Poll> {
    return this.poll(this.polls.length + 1)
  }

  handle (q: BlockingQuery): Promise<AgentResponse<T>> {
    const poll: Poll = { index: q.index ?? 0, signal: q.signal }
    this.polls.push(poll)
    for (const waiter of this.#waiters.filter((w) => w.count === this.polls.length)) {
      this.#waiters.splice(this.#waiters.indexOf(waiter), 1)
      waiter.resolve(poll)
    }
    if (this.#error !== null) return Promise.reject(this.#error)
    const current = this.#current
    if (current !== null && poll.index < current.index) return Promise.resolve(response(current.body, current.index, this.defaultAclPolicy))
    return new Promise<AgentResponse<T>>((resolve, reject) => {
      const held: Held<T> = { poll, resolve, reject }
      this.#held.add(held)
      q.signal?.addEventListener('abort', () => {
        if (!this.#held.delete(held)) return
        this.aborted++
        reject(q.signal?.reason)
      }, { once: true })
    })
  }
}

type EntryEndpoints = { [K in ConfigEntryKind]: FakeEndpoint<ConfigEntryViews[K] | null> }

export class StubAgent {
  readonly leaf = new FakeEndpoint<IssuedCert>('leaf')
  readonly roots = new FakeEndpoint<IndexedCARoots>('roots')
  readonly intentions = new FakeEndpoint<Intention[]>('intentions')
  readonly entries: EntryEndpoints = {
    'service-defaults': new FakeEndpoint('service-defaults'),
    'proxy-defaults': new FakeEndpoint('proxy-defaults'),
    mesh: new FakeEndpoint('mesh')
  }

  /** `GET /v1/config/jwt-provider`: no providers at index 1 unless set otherwise; null: an agent before 1.16. */
  readonly jwtProviders = new FakeEndpoint<unknown[] | null>('jwt-providers')

  constructor () {
    this.jwtProviders.set([], 1)
  }

  /** What each call asked for: `leaf api`, `service-defaults api`, `agentSelf`, ... */
  readonly requests: string[] = []
  /** The answer of `agentSelf()`; by default it never comes. */
  agentSelf: (signal?: AbortSignal) => Promise<AgentResponse<AgentSelfView>> = () => new Promise(() => {})

  get endpoints (): Array<FakeEndpoint<unknown>> {
    return [this.leaf, this.roots, this.intentions, ...Object.values(this.entries)] as Array<FakeEndpoint<unknown>>
  }

  get client (): AgentClient {
    const stub = {
      leaf: (service: string, q: BlockingQuery) => {
        this.requests.push(`leaf ${service}`)
        return this.leaf.handle(q)
      },
      roots: (q: BlockingQuery) => {
        this.requests.push('roots')
        return this.roots.handle(q)
      },
      intentionsMatch: (destination: string, q: BlockingQuery) => {
        this.requests.push(`intentions ${destination}`)
        return this.intentions.handle(q)
      },
      configEntry: (kind: ConfigEntryKind, name: string, q: BlockingQuery) => {
        this.requests.push(`${kind} ${name}`)
        return (this.entries[kind] as FakeEndpoint<unknown>).handle(q)
      },
      jwtProviders: (q: BlockingQuery) => this.jwtProviders.handle(q),
      agentSelf: (signal?: AbortSignal) => {
        this.requests.push('agentSelf')
        return this.agentSelf(signal)
      }
    }
    return stub as unknown as AgentClient
  }
}

/** The leaf endpoint's body for a certificate signed by the dev CA (Consul's second-precision times). */
export function issuedCert (signed: SignedLeaf, service: string, index = 1): IssuedCert {
  return {
    SerialNumber: signed.serialNumber,
    CertPEM: signed.certPem,
    PrivateKeyPEM: signed.privateKeyPem,
    Service: service,
    ServiceURI: signed.uri,
    ValidAfter: signed.validAfter.toISOString().replace(/\.\d{3}Z$/, 'Z'),
    ValidBefore: signed.validBefore.toISOString().replace(/\.\d{3}Z$/, 'Z'),
    CreateIndex: index,
    ModifyIndex: index
  }
}

export function caRoots (ca: DevCertificateAuthority): IndexedCARoots {
  return { ActiveRootID: ca.activeRootId(), TrustDomain: ca.trustDomain, Roots: ca.roots() }
}

export interface LogEntry {
  readonly level: string
  readonly obj: { consulNative?: Record<string, unknown>, [key: string]: unknown }
  readonly msg: string
}

export interface RecordingLogger {
  readonly log: FastifyBaseLogger
  readonly entries: LogEntry[]
  /** Entries whose `consulNative.event` is `event`. */
  events: (event: string) => LogEntry[]
}

export function recordingLogger (): RecordingLogger {
  const entries: LogEntry[] = []
  const level = (name: string) => (obj: LogEntry['obj'], msg: string): void => {
    entries.push({ level: name, obj, msg })
  }
  const log: Record<string, unknown> = {
    level: 'trace',
    fatal: level('fatal'),
    error: level('error'),
    warn: level('warn'),
    info: level('info'),
    debug: level('debug'),
    trace: level('trace'),
    silent: () => {},
    child: () => log
  }
  return {
    log: log as unknown as FastifyBaseLogger,
    entries,
    events: (event) => entries.filter((entry) => entry.obj.consulNative?.event === event)
  }
}

/**
 * Awaits `promise` while holding the event loop open: the watches' backoff timers are unref()'d,
 * so a test waiting on a retry would otherwise see the process exit first. Not a delay: it
 * resolves as soon as `promise` does.
 */
export async function holdingOpen<T> (promise: Promise<T>): Promise<T> {
  const handle = setInterval(() => {}, 60_000)
  try {
    return await promise
  } finally {
    clearInterval(handle)
  }
}
