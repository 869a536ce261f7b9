// Keeps everything a decision needs in memory: leaf + roots from the certificate source (→ TLS),
// and, by blocking queries to the agent, intentions + protocol + default policy (→ compiled
// policy) and the mesh request normalization. A failed or malformed update never replaces the
// last good state.
import { EventEmitter } from 'node:events'
import type { FastifyBaseLogger } from 'fastify'
import { agentStatusOf } from './agent/client'
import type { AgentClient } from './agent/client'
import type { ConfigEntryViews } from './agent/parse'
import { BlockingWatch } from './agent/watch'
import type { Intention, RequestNormalization } from './agent/wire'
import { AgentCertificateSource } from './certificates/agent'
import { checkLeaf, leafHold } from './certificates/checks'
import type { LeafHold } from './certificates/checks'
import type { CertificateSink, CertificateSource, LeafCertificate, SourcePart, TrustBundle } from './certificates/source'
import { NotReadyError } from './errors'
import { compilePolicy } from './intentions/policy'
import type { CompiledPolicy } from './intentions/policy'
import type { CandidateStatus } from './candidate'
import { JwtProviders } from './jwt/provider'
import { JwtAuthenticator } from './jwt/request-tokens'
import type { Enforcement, ResolvedOptions } from './options'
import type { RegistrationState, ServiceRegistration } from './registration'
import type { DynamicTls } from './tls'
import { emitToEach, logEvent } from './log'

/** Snapshot returned by `fastify.consulNative.status()`. */
export interface ConsulNativeStatus {
  ready: boolean
  service: string
  trustDomain: string | null
  leaf: { serial: string, validAfter: string, validBefore: string, uri: string } | null
  roots: { activeRootId: string, ids: string[] } | null
  intentions: { count: number, index: number, defaultAllow: boolean, protocol: string, requestNormalization: RequestNormalization | null } | null
  watches: Record<string, { lastSuccess: string | null, lastError: string | null, failures: number }>
  /** Registration with the agent (option `register`), or null when the plugin does not register. */
  registration: (RegistrationState & { id: string }) | null
  /**
   * The enforcement in force (docs/semantics.md#rollout-status): the plugin's `enforcement` option,
   * and the routes whose own setting differs from it (`'METHOD /url'` → mode).
   */
  enforcement: { mode: Enforcement, routes: Record<string, Enforcement> }
  /** The candidate intentions (option `candidate`), or null without one. */
  candidate: CandidateStatus | null
}

/** The rollout part of the status, supplied by the plugin. */
export interface RolloutStatus { enforcement: ConsulNativeStatus['enforcement'], candidate: CandidateStatus | null }

// Warn when the leaf has less than this share of its lifetime left and the agent is failing.
const EXPIRY_WARNING_SHARE = 0.2
const EXPIRY_CHECK_MS = 60_000

/**
 * Emits `'tls'` after new certificate material is installed and `'intentions'` after a new
 * policy (or request normalization) is in force, each with the current status; `'sync-error'`
 * with `{ watch, error }` when a poll fails or an update is rejected (the last good state stays).
 */
export class ConsulSync {
  /** Public events (`fastify.consulNative.events`); a throwing listener is logged, never taken as a rejected update. */
  readonly events = new EventEmitter()
  readonly #opts: ResolvedOptions
  readonly #client: AgentClient
  readonly #tls: DynamicTls
  readonly #log: FastifyBaseLogger
  readonly #source: CertificateSource
  readonly #intentions: BlockingWatch<Intention[]>
  readonly #serviceDefaults: BlockingWatch<ConfigEntryViews['service-defaults'] | null>
  readonly #proxyDefaults: BlockingWatch<ConfigEntryViews['proxy-defaults'] | null>
  readonly #mesh: BlockingWatch<ConfigEntryViews['mesh'] | null>
  readonly #jwtProviders: BlockingWatch<unknown[]>
  readonly #providers: JwtProviders
  /** Verifies the tokens JWT requirements look at (docs/semantics.md#jwt). */
  readonly jwt: JwtAuthenticator
  readonly #watches: ReadonlyArray<BlockingWatch<unknown>>
  // The values in force (a watch sets its own value only after `accept` returns).
  /** The leaf in force (status(), readiness, the expiry alarm, the rotation log line). */
  #installedLeaf: LeafCertificate | null = null
  #currentRoots: TrustBundle | undefined = undefined
  /**
   * A new leaf not in force yet (see #offer), the timer that looks at it again, and, once said, why
   * it waits (or why it was dropped): status() shows that until a later leaf is offered.
   */
  #heldLeaf: LeafCertificate | null = null
  #holdTimer: NodeJS.Timeout | null = null
  /**
   * Since when no new leaf has gone in force although one came: kept across held leaves that
   * replace each other, so that neither roots nor leaves arriving every few seconds put off the
   * report; said once per such period.
   */
  #heldSince: number | null = null
  #reportedSince: number | null = null
  #heldReason: string | null = null
  /** Why the held leaf waits, at once: a readyTimeout names it (status() waits for the report). */
  #holdError: Error | null = null
  readonly #tlsReady: Promise<void>
  readonly #tlsInstalled: () => void
  #currentIntentions: Intention[] = []
  // Resolved before any watch starts (start() awaits it first).
  #defaultAllow = false
  #started = false
  #policy: CompiledPolicy
  #compiled = false
  #policyIndex = 0
  #protocol = 'tcp'
  #normalization: RequestNormalization | null = null
  #expiryTimer: NodeJS.Timeout | null = null
  #stopped = false
  #defaultPolicyKnown = false
  #providersLoaded = false
  #defaultPolicyError: Error | null = null
  readonly #startup = new AbortController()
  readonly #warned = new Set<string>()
  readonly #failureCounts: Record<string, number> = {}
  /** Set by the plugin when it registers the instance; reported by status(). */
  registration: ServiceRegistration | null = null
  /** Set by the plugin: enforcement and candidate, reported by status(). */
  rollout: () => RolloutStatus

  /** `source`: where the leaf and roots come from; by default the agent's endpoints. */
  constructor (opts: ResolvedOptions, client: AgentClient, tls: DynamicTls, log: FastifyBaseLogger, source?: CertificateSource) {
    this.#opts = opts
    this.rollout = () => ({ enforcement: { mode: opts.enforcement, routes: {} }, candidate: null })
    this.#policy = compilePolicy({ destination: opts.service, intentions: [], defaultAllow: false, protocol: 'tcp' })
    this.#client = client
    this.#tls = tls
    this.#log = log
    const waitMs = opts.blockingWait
    const watchLog = log
    const service = opts.service

    this.#source = source ?? new AgentCertificateSource(client, service, waitMs, watchLog)
    let installed!: () => void
    this.#tlsReady = new Promise<void>((resolve) => { installed = resolve })
    this.#tlsInstalled = installed
    this.#intentions = new BlockingWatch<Intention[]>({
      name: 'intentions',
      waitMs,
      log: watchLog,
      fetch: async (q) => pick(await client.intentionsMatch(service, q)),
      differs: (a, b) => JSON.stringify(a) !== JSON.stringify(b),
      accept: (list) => this.#compile({ intentions: list, index: this.#intentions.index })
    })
    const entryWatch = <K extends keyof ConfigEntryViews>(kind: K, entry: string,
      accept: (value: ConfigEntryViews[K] | null) => void): BlockingWatch<ConfigEntryViews[K] | null> =>
        new BlockingWatch<ConfigEntryViews[K] | null>({
          name: kind,
          waitMs,
          log: watchLog,
          fetch: async (q) => pick(await client.configEntry(kind, entry, q)),
          differs: (a, b) => JSON.stringify(a) !== JSON.stringify(b),
          accept
        })
    this.#serviceDefaults = entryWatch('service-defaults', service,
      (entry) => this.#compile({ protocol: protocolOf(entry, this.#proxyDefaults.value) }))
    this.#proxyDefaults = entryWatch('proxy-defaults', 'global',
      (entry) => this.#compile({ protocol: protocolOf(this.#serviceDefaults.value, entry) }))
    this.#mesh = entryWatch('mesh', 'mesh', (entry) => {
      this.#normalization = entry?.requestNormalization ?? null
      // The normalization changes decisions as much as the intentions do.
      if (this.#started) this.#emit('intentions', this.status())
    })
    this.#providers = new JwtProviders(log, (event) => this.#emit('jwks', event))
    this.jwt = new JwtAuthenticator(this.#providers, log)
    // Every provider, in one blocking query: intentions name them, and a service token may read them.
    this.#jwtProviders = new BlockingWatch<unknown[]>({
      name: 'jwt-providers',
      waitMs,
      log: watchLog,
      fetch: async (q) => {
        const res = await client.jwtProviders(q)
        if (res.body !== null) return pick(res as { index: number | null, body: unknown[] })
        // An agent before 1.16 has no providers; ask again no more often than a blocking query would.
        if (q.index > 0) await sleep(q.waitMs, q.signal)
        return { index: 1, value: [] }
      },
      differs: (a, b) => JSON.stringify(a) !== JSON.stringify(b),
      accept: (list) => {
        this.#providers.update(list)
        this.#providersLoaded = true
        // Verified tokens name the providers they were verified with; a changed provider voids them anyway.
        this.jwt.checkReferenced(this.#policy.jwtProviders)
        if (this.#started) this.#emit('intentions', this.status())
      }
    })
    this.#watches = [this.#intentions, this.#serviceDefaults, this.#proxyDefaults, this.#mesh, this.#jwtProviders] as
      ReadonlyArray<BlockingWatch<unknown>>
    this.#failureCounts.leaf = 0
    this.#failureCounts.roots = 0
    for (const watch of this.#watches) {
      this.#failureCounts[watch.name] = 0
      watch.onFailure((error) => this.#failed(watch.name, error))
    }
  }

  #failed (name: string, error: Error): void {
    this.#failureCounts[name] = (this.#failureCounts[name] as number) + 1
    this.#emit('sync-error', { watch: name, error })
  }

  /** The compiled policy in force: deny-all until the first inputs are in (start() resolves once all have). */
  get policy (): CompiledPolicy { return this.#policy }
  get normalization (): RequestNormalization | null { return this.#normalization }

  /** The live inputs of the policy in force, to compile a candidate against. */
  get liveInputs (): { intentions: readonly Intention[], defaultAllow: boolean, protocol: string, maxRegexProgramSize: number } {
    return { intentions: this.#currentIntentions, defaultAllow: this.#defaultAllow, protocol: this.#protocol, maxRegexProgramSize: this.#opts.maxRegexProgramSize }
  }

  /** Every first value loaded, and the leaf within its validity period. */
  get ready (): boolean {
    const leaf = this.#installedLeaf
    if (!this.#started || leaf === null) return false
    const now = Date.now()
    return now >= Date.parse(leaf.validAfter) && now < Date.parse(leaf.validBefore)
  }

  /** Starts every watch and resolves when all first values are in, or rejects after `readyTimeout`. */
  async start (): Promise<void> {
    const timeoutMs = this.#opts.readyTimeout
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(this.#notReady(timeoutMs)), timeoutMs)
    })
    try {
      await Promise.race([this.#startAll(), timeout])
    } catch (err) {
      this.stop()
      throw err
    } finally {
      clearTimeout(timer)
    }
    this.#expiryTimer = setInterval(() => this.checkExpiry(Date.now()), EXPIRY_CHECK_MS).unref()
  }

  async #startAll (): Promise<void> {
    // The default policy decides every request no intention matches, so it is known first.
    this.#defaultAllow = await this.#resolveDefaultPolicy()
    this.#defaultPolicyKnown = true
    const sink: CertificateSink = {
      update: (change) => { this.#offer(change) },
      failure: (part: SourcePart, error) => this.#failed(part, error)
    }
    this.#source.start(sink)
    for (const watch of this.#watches) watch.start()
    await Promise.all([this.#tlsReady, ...this.#watches.map(async (watch) => await watch.ready())])
    // Remote key sets with FetchAsynchronously false: the first fetch comes before serving (docs/semantics.md#jwt-key-sets).
    await this.#providers.ready(this.#policy.jwtProviders)
    this.#started = true
  }

  /** Failed polls and rejected updates since start, per watch. */
  get failureCounts (): Readonly<Record<string, number>> { return this.#failureCounts }

  stop (): void {
    if (this.#stopped) return
    this.#stopped = true
    this.#startup.abort()
    this.#source.stop()
    for (const watch of this.#watches) watch.stop()
    this.#providers.stop()
    if (this.#expiryTimer !== null) clearInterval(this.#expiryTimer)
    this.#release(true)
  }

  status (): ConsulNativeStatus {
    // The leaf in force; before any, one held back at the start (shown, not yet served).
    const leaf = this.#installedLeaf ?? this.#heldLeaf ?? undefined
    const roots = this.#currentRoots
    const watches: ConsulNativeStatus['watches'] = {}
    for (const [name, health] of Object.entries(this.#source.health())) {
      // A held leaf is the leaf part's problem while it waits (said once the wait is long enough to matter).
      const held = name === 'leaf' ? this.#heldReason : null
      watches[name] = { lastSuccess: health.lastSuccess?.toISOString() ?? null, lastError: health.lastError?.message ?? held, failures: health.failures }
    }
    for (const watch of this.#watches) {
      watches[watch.name] = {
        lastSuccess: watch.lastSuccess?.toISOString() ?? null,
        lastError: watch.lastError?.message ?? null,
        failures: watch.failures
      }
    }
    return {
      ready: this.ready,
      service: this.#opts.service,
      trustDomain: roots?.trustDomain ?? null,
      leaf: leaf === undefined ? null : { serial: leaf.serial, validAfter: leaf.validAfter, validBefore: leaf.validBefore, uri: leaf.uri },
      roots: roots === undefined ? null : { activeRootId: roots.activeRootId, ids: [...roots.rootIds] },
      intentions: !this.#compiled
        ? null
        : { count: this.#policy.size, index: this.#policyIndex, defaultAllow: this.#defaultAllow, protocol: this.#protocol, requestNormalization: this.#normalization },
      watches,
      registration: this.registration === null ? null : { id: this.registration.id, ...this.registration.state },
      ...this.rollout()
    }
  }

  /**
   * New material from the certificate source. A leaf that can never be served (expired, or its key
   * is another's) is thrown, so the source rejects it and the last good stays. A leaf that cannot be
   * served yet (valid later, or not signed by the roots in force) is held back and put in force once
   * it can: when it becomes valid, or with the roots that sign it (docs/semantics.md#last-good).
   */
  #offer (change: { leaf?: LeafCertificate, trust?: TrustBundle }): void {
    const now = Date.now()
    if (change.leaf !== undefined) {
      checkLeaf(change.leaf, now)
      this.#release()
      this.#heldLeaf = change.leaf
    }
    const roots = change.trust ?? this.#currentRoots
    const held = this.#heldLeaf
    // The start, before any roots: a held leaf is checked and put in force with the roots.
    if (roots === undefined) return
    let leaf = this.#installedLeaf ?? undefined
    if (held !== null) {
      const hold = leafHold(held, roots, now)
      if (hold === null && change.leaf !== undefined) {
        // The leaf watch's own value: should TLS refuse it, the watch rejects it.
        this.#release(true)
        leaf = held
      } else if (hold === null) {
        // Put in force by new roots (or by time): a refusal by TLS is this leaf's, not the roots'.
        this.#release(true)
        try {
          this.#installTls(held, roots)
          return
        } catch (err) {
          this.#dropHeld(held, (err as Error).message)
        }
      } else if (hold.kind === 'expired') {
        this.#dropHeld(held, hold.reason)
      } else {
        this.#hold(held, hold, now)
      }
    }
    if (leaf === undefined) {
      this.#currentRoots = roots
      return
    }
    // A held leaf alone changes nothing in force.
    if (leaf === this.#installedLeaf && roots === this.#currentRoots) return
    this.#installTls(leaf, roots)
  }

  /** Waits for `leaf` to become servable: offered again once valid; reported if it still waits after a while. */
  #hold (leaf: LeafCertificate, hold: LeafHold, now: number): void {
    if (this.#holdTimer !== null) clearTimeout(this.#holdTimer)
    const until = hold.kind === 'not-yet-valid' ? hold.until : Infinity
    this.#holdError = new Error(hold.reason)
    this.#heldSince ??= now
    // Wakes to report (once per period), and to look again when the leaf becomes valid; a leaf the
    // roots do not sign is looked at again with the next roots, not by a timer.
    const wakeAt = this.#reportedSince === this.#heldSince ? until : Math.min(until + 1, this.#heldSince + syncTimings.heldLeafReportMs)
    if (wakeAt === Infinity) return
    // Cleared whenever the held leaf goes (put in force, replaced, dropped, stop()): it fires only for this one.
    this.#holdTimer = setTimeout(() => {
      this.#holdTimer = null
      if (Date.now() < until) {
        this.#reportHeld(leaf, hold.reason)
        // Not valid yet: looked at again when it is. Not signed: looked at again with the next roots.
        if (until !== Infinity) this.#hold(leaf, hold, Date.now())
        return
      }
      // Valid now. Nothing else changes, so nothing throws here: the held leaf is put in force, or
      // dropped and said (#offer catches a refusal by TLS).
      this.#offer({})
      // At most a day at a time: a longer delay overflows Node's timers, which then fire at once.
    }, Math.min(Math.max(0, wakeAt - now), DAY_MS)).unref()
  }

  /** Said once per period without a new leaf in force (status() follows the latest reason): not in force, and why. */
  #reportHeld (leaf: LeafCertificate, reason: string): void {
    this.#heldReason = reason
    // Said already: only a leaf valid more than a day later wakes before it is valid again (the
    // timer's cap), which no test waits for.
    /* c8 ignore next */
    if (this.#reportedSince === this.#heldSince) return
    this.#reportedSince = this.#heldSince
    logEvent(this.#log, 'warn', 'leaf-held', { serial: leaf.serial, reason },
      `new leaf not in force, ${this.#installedLeaf === null ? 'and none is yet' : 'keeping the last good one'}: ${reason}`)
    this.#failed('leaf', new Error(reason))
  }

  /** A held leaf that will never serve (expired while held, or refused by TLS): dropped, and said. */
  #dropHeld (leaf: LeafCertificate, reason: string): void {
    this.#release(true)
    const none = this.#installedLeaf === null
    this.#heldReason = reason
    this.#holdError = new Error(reason)
    logEvent(this.#log, 'error', 'leaf-held', { serial: leaf.serial, reason },
      `new leaf dropped, ${none ? 'and none is in force yet' : 'keeping the last good one'}: ${reason}`)
    this.#failed('leaf', this.#holdError)
  }

  /**
   * Forgets the held leaf: replaced by a newer one (the period without a new leaf in force goes on),
   * or `ended` (put in force, dropped, stop()).
   */
  #release (ended = false): void {
    if (this.#holdTimer !== null) clearTimeout(this.#holdTimer)
    this.#holdTimer = null
    this.#heldLeaf = null
    this.#heldReason = null
    this.#holdError = null
    if (ended) this.#heldSince = null
  }

  #installTls (leaf: LeafCertificate, roots: TrustBundle): void {
    this.#tls.update({
      certPem: leaf.chainPem,
      keyPem: leaf.keyPem,
      rootPems: roots.rootPems,
      intermediatePems: roots.intermediatePems,
      trustDomain: roots.trustDomain
    })
    this.#currentRoots = roots
    const before = this.#installedLeaf
    this.#installedLeaf = leaf
    if (before !== null) {
      logEvent(this.#log, 'info', 'tls-rotated', {
        serial: leaf.serial,
        validBefore: leaf.validBefore,
        previousSerial: before.serial,
        previousValidBefore: before.validBefore,
        roots: roots.rootPems.length,
        activeRootId: roots.activeRootId
      }, 'TLS material updated')
    }
    this.#tlsInstalled()
    this.#emit('tls', this.status())
  }

  /**
   * Recompiles the policy with one input changed; throws (keeping the last good policy) when it
   * cannot. Until the first intentions arrive the list is empty, which nothing serves on: start()
   * resolves only once every first value is in.
   */
  #compile (change: { intentions?: Intention[], index?: number, protocol?: string }): void {
    const intentions = change.intentions ?? this.#currentIntentions
    const protocol = change.protocol ?? this.#protocol
    const policy = compilePolicy({
      destination: this.#opts.service, intentions, defaultAllow: this.#defaultAllow, protocol, maxRegexProgramSize: this.#opts.maxRegexProgramSize
    })
    for (const warning of policy.warnings) {
      // Once per distinct cause for the life of the plugin, not on every recompile.
      if (this.#warned.has(warning)) continue
      this.#warned.add(warning)
      logEvent(this.#log, 'warn', 'intention-unsupported', { reason: warning }, `${warning}`)
    }
    this.#policy = policy
    // Before the first provider list, every provider would look missing.
    if (this.#providersLoaded) this.jwt.checkReferenced(policy.jwtProviders)
    this.#compiled = true
    this.#currentIntentions = intentions
    this.#protocol = protocol
    this.#policyIndex = change.index ?? this.#policyIndex
    logEvent(this.#log, 'info', 'policy-updated', { count: policy.size, index: this.#policyIndex, protocol }, 'intentions updated')
    this.#emit('intentions', this.status())
  }

  async #resolveDefaultPolicy (): Promise<boolean> {
    const configured = this.#opts.defaultPolicy
    if (configured !== 'agent') return configured === 'allow'
    const found = await agentDefaultPolicy(this.#client, this.#startup.signal, (err) => { this.#defaultPolicyError = err })
    if (found.error !== null) {
      logEvent(this.#log, 'warn', 'default-policy-unknown', { reason: found.error.message, header: found.header }, found.header === 'allow'
        ? 'cannot read the agent\'s default intention policy; its ACL default policy header says allow'
        : 'cannot read the agent\'s default intention policy, denying by default')
    }
    return found.allow
  }

  #notReady (timeoutMs: number): Error {
    if (!this.#defaultPolicyKnown) {
      const cause = this.#defaultPolicyError
      // Everything else waits for it: named too, so that the message lists all that is missing.
      const waiting = ['leaf', 'roots', ...this.#watches.map((watch) => watch.name)].join(', ')
      return new NotReadyError(timeoutMs, `agent/self (default intention policy): ${cause?.message ?? 'no answer yet'}; waiting for it: ${waiting}`,
        { cause: cause ?? undefined })
    }
    const health = this.#source.health()
    const missing: Array<{ name: string, lastError: Error | null }> = [
      // None in force: none came, or one is held back for a reason (not one merely waiting for the first roots).
      ...this.#installedLeaf === null && (this.#heldLeaf === null || this.#holdError !== null)
        ? [{ name: 'leaf', lastError: health.leaf.lastError ?? this.#holdError }]
        : [],
      ...this.#currentRoots === undefined ? [{ name: 'roots', lastError: health.roots.lastError }] : [],
      ...this.#watches.filter((watch) => watch.value === undefined)
    ]
    const causes = missing.map((watch) => `${watch.name}: ${watch.lastError?.message ?? 'no answer yet'}`)
    const first = missing.find((watch) => watch.lastError !== null)
    return new NotReadyError(timeoutMs, causes.join('; '), { cause: first?.lastError ?? undefined })
  }

  #emit (event: string, payload: unknown): void {
    emitToEach(this.events, event, payload, this.#log)
  }

  /** Logs loudly when the leaf nears expiry while the agent cannot renew it (run every minute). */
  checkExpiry (now: number): void {
    const leaf = this.#installedLeaf
    // Failing polls, answers whose leaf was rejected, or a renewal held back (its roots never came):
    // either way no renewal is in force.
    const cause = this.#source.health().leaf.lastError ?? this.#holdError
    if (leaf === null || cause === null) return
    const start = Date.parse(leaf.validAfter)
    const end = Date.parse(leaf.validBefore)
    const left = end - now
    if (left > (end - start) * EXPIRY_WARNING_SHARE) return
    logEvent(this.#log, 'error', 'leaf-expiring', { serial: leaf.serial, validBefore: leaf.validBefore, msLeft: left, cause: cause.message }, `leaf certificate expires in ${Math.max(0, Math.round(left / 60_000))} minutes and ${this.#source.renewer} cannot renew it`)
  }
}

/**
 * The agent's default intention decision (docs/semantics.md#default-policy): its
 * default_intention_policy, then its ACL default policy, then the X-Consul-Default-ACL-Policy
 * header (on every answer, even when agent/self is refused); deny when none is known. `error`
 * says why agent/self could not be read. Rethrows when `signal` aborted.
 */
export async function agentDefaultPolicy (client: AgentClient, signal?: AbortSignal, onSelfError?: (err: Error) => void):
Promise<{ allow: boolean, error: Error | null, header: 'allow' | 'deny' | null }> {
  try {
    // Only a refusal (a token without agent:read) is an answer: the ACL default of another
    // answer's header stands in. Anything else (an agent restarting, a 5xx, a bad body) is asked
    // again until it answers or the start times out: taking the header then would fail open for
    // good wherever the agent's own setting is deny but its ACL default is allow (ACLs off).
    const self = await askedUntilAnswered(async () => await client.agentSelf(signal), (err) => {
      // Known before the next attempt, which may hang: a readyTimeout then names this failure.
      onSelfError?.(err as Error)
      return agentStatusOf(err) !== 403
    }, signal)
    return { allow: (self.body.defaultIntentionPolicy ?? self.body.aclDefaultPolicy ?? self.defaultAclPolicy) === 'allow', error: null, header: self.defaultAclPolicy }
  } catch (err) {
    if (signal?.aborted === true || agentStatusOf(err) !== 403) throw err
    const header = (await askedUntilAnswered(async () => await client.roots({ signal }), () => true, signal)).defaultAclPolicy
    return { allow: header === 'allow', error: err as Error, header }
  }
}

/**
 * `attempt`'s answer; a failure that `retry` accepts is asked again after a backoff, until `signal`
 * aborts. Without a signal (the explain and verify commands, which have no deadline to end the
 * asking) the first failure is the caller's.
 */
async function askedUntilAnswered<T> (attempt: () => Promise<T>, retry: (err: unknown) => boolean, signal: AbortSignal | undefined,
  delay = DEFAULT_POLICY_RETRY_MS): Promise<T> {
  try {
    return await attempt()
  } catch (err) {
    if (!retry(err) || signal === undefined || signal.aborted) throw err
    await sleep(delay, signal)
    if (signal.aborted) throw err
    return await askedUntilAnswered(attempt, retry, signal, Math.min(delay * 2, DEFAULT_POLICY_RETRY_MAX_MS))
  }
}

/**
 * A held leaf still waiting after `heldLeafReportMs` is reported (a CA rotation's leaf normally
 * waits for its roots for less). An object, so that tests can shorten it.
 */
export const syncTimings = { heldLeafReportMs: 10_000 }

const DAY_MS = 86_400_000

/** Retries of the default policy's read at start: from this, doubling, up to the maximum. */
const DEFAULT_POLICY_RETRY_MS = 250
const DEFAULT_POLICY_RETRY_MAX_MS = 4_000

async function sleep (ms: number, signal: AbortSignal | undefined): Promise<void> {
  await new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, ms)
    signal?.addEventListener('abort', () => { clearTimeout(timer); resolve() }, { once: true })
  })
}

function pick<T> (res: { index: number | null, body: T }): { index: number | null, value: T } {
  return { index: res.index, value: res.body }
}

/** Consul's protocol resolution: service-defaults, then proxy-defaults `global`, else tcp. */
export function protocolOf (serviceDefaults: { protocol: string | null } | null | undefined, proxyDefaults: { protocol: string | null } | null | undefined): string {
  // An empty Protocol is "not set" in Consul, like an absent one.
  return (serviceDefaults?.protocol ?? '') || (proxyDefaults?.protocol ?? '') || 'tcp'
}
