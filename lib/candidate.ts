// Candidate intentions (docs/semantics.md#rollout-candidate): a `service-intentions` config entry in
// Consul's JSON form, turned into the intention list the agent would serve if it were written,
// and compiled with the same compiler as the live intentions. The file form is re-read when it
// changes; a bad file keeps the last good candidate.
import { readFile } from 'node:fs/promises'
import { unwatchFile, watchFile } from 'node:fs'
import type { FastifyBaseLogger } from 'fastify'
import { parseIntention } from './agent/parse'
import type { Intention, IntentionPermission } from './agent/wire'
import { checkPermissionsAsWritten, compilePolicy, isHttpLike } from './intentions/policy'
import type { CompiledPolicy } from './intentions/policy'
import { logEvent } from './log'

/** A candidate entry that cannot be used; the message says what to fix. */
export class CandidateError extends Error {}

// Keys as `consul config write` accepts them: CamelCase, or any case with underscores.
const KEYS = ['Kind', 'Name', 'Namespace', 'Partition', 'Meta', 'JWT', 'Sources', 'Peer', 'SamenessGroup', 'Action',
  'Permissions', 'Precedence', 'Type', 'Description', 'LegacyID', 'LegacyMeta', 'LegacyCreateTime', 'LegacyUpdateTime',
  'HTTP', 'PathExact', 'PathPrefix', 'PathRegex', 'Methods', 'Header', 'Present', 'Exact', 'Prefix', 'Suffix', 'Contains',
  'Regex', 'Invert', 'IgnoreCase', 'Providers', 'VerifyClaims', 'Path', 'Value', 'CreateIndex', 'ModifyIndex']
const CANONICAL = new Map(KEYS.map((key) => [key.toLowerCase(), key]))
const ENTRY_KEYS = new Set(['Kind', 'Name', 'Namespace', 'Partition', 'Meta', 'JWT', 'Sources', 'CreateIndex', 'ModifyIndex'])
const SOURCE_KEYS = new Set(['Name', 'Namespace', 'Partition', 'Peer', 'SamenessGroup', 'Action', 'Permissions', 'Precedence',
  'Type', 'Description', 'LegacyID', 'LegacyMeta', 'LegacyCreateTime', 'LegacyUpdateTime'])

type Json = Record<string, unknown>

function isObject (value: unknown): value is Json {
  return value !== null && typeof value === 'object' && !Array.isArray(value)
}

/** Canonical key spelling, recursively; free-form maps (`Meta`, `LegacyMeta`) keep their keys. */
function canonical (value: unknown, at: string): unknown {
  if (Array.isArray(value)) return value.map((item, i) => canonical(item, `${at}[${i}]`))
  if (!isObject(value)) return value
  const out: Json = {}
  for (const [key, item] of Object.entries(value)) {
    const name = CANONICAL.get(key.toLowerCase().replace(/_/g, ''))
    if (name === undefined) throw new CandidateError(`${at}: unknown key ${JSON.stringify(key)}`)
    if (Object.hasOwn(out, name)) throw new CandidateError(`${at}: ${JSON.stringify(key)} repeats ${name}`)
    out[name] = name === 'Meta' || name === 'LegacyMeta' ? item : canonical(item, at === '' ? name : `${at}.${name}`)
  }
  return out
}

function optionalString (o: Json, key: string, at: string): string {
  const v = o[key]
  if (v === undefined || v === null) return ''
  if (typeof v !== 'string') throw new CandidateError(`${at}.${key} must be a string`)
  return v
}

/**
 * The intentions a `service-intentions` entry for `service` (or `*`) defines, as the agent's
 * match endpoint would list them (docs/semantics.md#precedence-numbers for `Precedence`),
 * shape-checked as the agent's answers are; matchers and regexes are checked by the compiler.
 */
export function candidateIntentions (raw: unknown, service: string): { destination: string, intentions: Intention[] } {
  if (!isObject(raw)) throw new CandidateError('the candidate must be a JSON object (a service-intentions config entry)')
  const entry = canonical(raw, '') as Json
  for (const key of Object.keys(entry)) {
    if (!ENTRY_KEYS.has(key)) throw new CandidateError(`${key} is not a field of a service-intentions entry`)
  }
  if (entry.Kind !== 'service-intentions') throw new CandidateError(`Kind must be "service-intentions", got ${JSON.stringify(entry.Kind)}`)
  const destination = optionalString(entry, 'Name', 'entry')
  if (destination !== service && destination !== '*') {
    throw new CandidateError(`Name must be this service (${JSON.stringify(service)}) or "*", got ${JSON.stringify(destination)}`)
  }
  const destinationNS = optionalString(entry, 'Namespace', 'entry') || 'default'
  const destinationPartition = optionalString(entry, 'Partition', 'entry')
  const sources = entry.Sources
  if (!Array.isArray(sources) || sources.length === 0) throw new CandidateError('Sources must be a non-empty array')
  const seen = new Set<string>()
  const intentions = sources.map((src: unknown, i): Intention => {
    const at = `Sources[${i}]`
    if (!isObject(src)) throw new CandidateError(`${at} must be an object`)
    for (const key of Object.keys(src)) {
      if (!SOURCE_KEYS.has(key)) throw new CandidateError(`${at}.${key} is not a field of a source`)
    }
    const name = optionalString(src, 'Name', at)
    if (name === '') throw new CandidateError(`${at}.Name is required`)
    const namespace = optionalString(src, 'Namespace', at) || 'default'
    if ((name !== '*' && name.includes('*')) || (namespace !== '*' && namespace.includes('*'))) {
      throw new CandidateError(`${at}: wildcard character '*' cannot be used with partial values`)
    }
    if (namespace === '*' && name !== '*') throw new CandidateError(`${at}: an exact name cannot follow a wildcard namespace`)
    const permissions = src.Permissions
    if (permissions !== undefined && permissions !== null && !Array.isArray(permissions)) throw new CandidateError(`${at}.Permissions must be an array`)
    const l7 = Array.isArray(permissions) && permissions.length > 0
    const action = optionalString(src, 'Action', at)
    if (l7 && action !== '') throw new CandidateError(`${at}.Action must be omitted if Permissions are specified`)
    if (!l7 && action !== 'allow' && action !== 'deny') throw new CandidateError(`${at}.Action must be set to 'allow' or 'deny'`)
    const peer = optionalString(src, 'Peer', at)
    // What `consul config write` refuses, before the compiler, which trusts validated input.
    const partition = optionalString(src, 'Partition', at)
    if (peer !== '' && partition !== '') throw new CandidateError(`${at}: Peer and Partition cannot both be set`)
    const type = optionalString(src, 'Type', at)
    if (type !== '' && type !== 'consul') throw new CandidateError(`${at}.Type must be set to 'consul'`)
    if (l7 && destination === '*') throw new CandidateError(`${at}.Permissions cannot be specified on intentions with wildcarded destinations`)
    if (l7) {
      try {
        checkPermissionsAsWritten(permissions as unknown[], `${at}.Permissions`)
      } catch (err) {
        throw new CandidateError((err as Error).message)
      }
    }
    const key = `${peer}\u0000${partition}\u0000${namespace}\u0000${name}`
    if (seen.has(key)) throw new CandidateError(`${at} defines ${JSON.stringify(name)} more than once`)
    seen.add(key)
    const exactness = (destination === '*' ? 3 : 0) + (namespace === '*' ? 2 : name === '*' ? 1 : 0)
    const ixn: Record<string, unknown> = {
      SourceName: name,
      SourceNS: namespace,
      SourcePartition: partition,
      SourcePeer: peer,
      SourceSamenessGroup: optionalString(src, 'SamenessGroup', at),
      DestinationName: destination,
      DestinationNS: destinationNS,
      DestinationPartition: destinationPartition,
      SourceType: 'consul',
      Precedence: 9 - exactness,
      CreateIndex: 0,
      ModifyIndex: 0
    }
    if (l7) ixn.Permissions = (permissions as unknown[]).map(upperMethods) as IntentionPermission[]
    else ixn.Action = action
    if (entry.JWT !== undefined && entry.JWT !== null) ixn.JWT = entry.JWT
    // The same shape checks as an intention from the agent: the compiler trusts its input.
    try {
      return parseIntention(ixn, at)
    } catch (err) {
      throw new CandidateError((err as Error).message)
    }
  })
  return { destination, intentions }
}

/** Consul stores methods upper-cased (docs/semantics.md#methods); `perm` passed checkPermissionsAsWritten. */
function upperMethods (perm: unknown): unknown {
  const checked = perm as { HTTP: { Methods?: string[] | null } }
  const methods = checked.HTTP.Methods
  if (!Array.isArray(methods)) return perm
  return { ...checked, HTTP: { ...checked.HTTP, Methods: methods.map((m) => m.toUpperCase()) } }
}

/** What the live side supplies to compile a candidate against. */
export interface LiveInputs {
  intentions: readonly Intention[]
  defaultAllow: boolean
  protocol: string
  /** The bound the live intentions are compiled with (docs/semantics.md#paths-regex-size). */
  maxRegexProgramSize?: number
}

/**
 * The live list with the candidate entry written: the intentions of the candidate's destination
 * entry are replaced, those of the other entry (`*` or this service) stay.
 */
export function compileCandidate (service: string, candidate: { destination: string, intentions: Intention[] }, live: LiveInputs): CompiledPolicy {
  // Consul refuses L7 permissions for a service whose protocol is not HTTP-like.
  if (candidate.destination !== '*' && !isHttpLike(live.protocol) && candidate.intentions.some((ixn) => (ixn.Permissions?.length ?? 0) > 0)) {
    throw new CandidateError(`service ${JSON.stringify(service)} has protocol ${JSON.stringify(live.protocol)}, which is incompatible with L7 intentions permissions`)
  }
  const kept = live.intentions.filter((ixn) => ixn.DestinationName !== candidate.destination)
  return compilePolicy({ destination: service, intentions: [...kept, ...candidate.intentions], defaultAllow: live.defaultAllow, protocol: live.protocol, maxRegexProgramSize: live.maxRegexProgramSize })
}

/** `status().candidate`. */
export interface CandidateStatus {
  /** `'inline'`, or the file path. */
  source: string
  /** Whether a candidate is in use (the last good one, when the latest read failed). */
  loaded: boolean
  /** Intentions the candidate entry defines. */
  count: number
  /** Why the latest read or compile failed, or null. */
  lastError: string | null
  /** Requests whose candidate decision differed from the live one. */
  disagreements: number
}

const FILE_POLL_MS = 1000

/**
 * Holds the compiled candidate, recompiled when the live inputs change and, for a file, when the
 * file changes. `policy` is null until a candidate has compiled once.
 */
export class Candidate {
  policy: CompiledPolicy | null = null
  /** Counts by live then candidate verdict: [allow→deny, deny→allow]. */
  readonly disagreements = { allowDeny: 0, denyAllow: 0 }
  readonly #service: string
  readonly #source: string | Record<string, unknown>
  readonly #log: FastifyBaseLogger
  readonly #live: () => LiveInputs
  readonly #onChange: () => void
  #entry: { destination: string, intentions: Intention[] } | null = null
  #lastError: string | null = null
  #watching = false
  #reading: Promise<void> = Promise.resolve()

  constructor (service: string, source: string | Record<string, unknown>, log: FastifyBaseLogger, live: () => LiveInputs, onChange: () => void) {
    this.#service = service
    this.#source = source
    this.#log = log
    this.#live = live
    this.#onChange = onChange
  }

  /** Loads the candidate once; for a file, starts watching it. A bad candidate is logged, never thrown. */
  async start (): Promise<void> {
    if (typeof this.#source !== 'string') {
      this.#accept(() => candidateIntentions(this.#source, this.#service))
      return
    }
    await this.#read()
    this.#watching = true
    watchFile(this.#source, { interval: FILE_POLL_MS, persistent: false }, this.#changed)
  }

  stop (): void {
    if (this.#watching && typeof this.#source === 'string') unwatchFile(this.#source, this.#changed)
    this.#watching = false
  }

  /** The live intentions, default policy or protocol changed: recompile against them. */
  relive (): void {
    if (this.#entry === null) return
    const entry = this.#entry
    this.#accept(() => entry)
  }

  status (): CandidateStatus {
    return {
      source: typeof this.#source === 'string' ? this.#source : 'inline',
      loaded: this.policy !== null,
      count: this.#entry?.intentions.length ?? 0,
      lastError: this.#lastError,
      disagreements: this.disagreements.allowDeny + this.disagreements.denyAllow
    }
  }

  /** fs.watchFile calls it when the file's stats change (appears, disappears, is written). */
  readonly #changed = (): void => {
    this.#reading = this.#reading.then(async () => await this.#read())
  }

  /** Resolves once the reads queued so far are done (tests and `explain` use it). */
  async settled (): Promise<void> {
    await this.#reading
  }

  async #read (): Promise<void> {
    const path = this.#source as string
    let text: string
    try {
      text = await readFile(path, 'utf8')
    } catch (err) {
      this.#reject(`cannot read ${path}: ${(err as Error).message}`)
      return
    }
    this.#accept(() => {
      let parsed: unknown
      try {
        parsed = JSON.parse(text)
      } catch (err) {
        throw new CandidateError(`${path} is not JSON: ${(err as Error).message}`)
      }
      return candidateIntentions(parsed, this.#service)
    })
  }

  #accept (load: () => { destination: string, intentions: Intention[] }): void {
    let entry: { destination: string, intentions: Intention[] }
    let policy: CompiledPolicy
    try {
      entry = load()
      policy = compileCandidate(this.#service, entry, this.#live())
    } catch (err) {
      this.#reject((err as Error).message)
      return
    }
    const first = this.policy === null
    this.#entry = entry
    this.policy = policy
    const changed = this.#lastError !== null || first
    this.#lastError = null
    if (changed) {
      logEvent(this.#log, 'info', 'candidate-loaded', { source: this.status().source, count: entry.intentions.length }, 'candidate intentions loaded')
    }
    this.#onChange()
  }

  #reject (reason: string): void {
    this.#lastError = reason
    logEvent(this.#log, 'error', 'candidate-rejected', { source: this.status().source, reason }, this.policy === null
      ? 'fastify-consul-native: candidate intentions rejected; no candidate decisions until it is fixed'
      : 'fastify-consul-native: candidate intentions rejected; the last good candidate stays in use')
    this.#onChange()
  }
}
