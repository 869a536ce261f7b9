// The intention endpoints Consul's own CLI uses (`consul intention create|get|delete|check|list`),
// on top of the config-entry store: since Consul 1.9 an intention IS a source of a
// `service-intentions` entry, so every write here is a config-entry write with the same
// validation (docs/semantics.md#rollout-dev-agent-intentions).
import { randomUUID } from 'node:crypto'
import type { ConnectAuthorizeResponse, Intention } from '../agent/wire'
import type { AuthorizeDefaults } from './authorize'
import { authorize } from './authorize'
import type { ConfigEntryStore } from './config-entries'
import { SERVICE_INTENTIONS, goQuote } from './config-entries'
import { DevAgentHttpError } from './http-error'

/** A source or destination as the query parameters name it (CE: namespace and partition are `default`). */
export interface IntentionName { readonly peer: string, readonly name: string }

type Json = Record<string, unknown>

function plain (message: string): DevAgentHttpError {
  // Consul's handlers return these as plain errors: 500 with the bare message.
  return new DevAgentHttpError(500, message)
}

/**
 * Consul's `parseIntentionStringComponent`: `name`, `ns/name`, `ap/ns/name`, or with
 * `allowPeer` `peer:p/name` and `peer:p/ns/name`. On CE the namespace and partition have no
 * effect (the match endpoint answers the same way).
 */
export function parseIntentionName (input: string, allowPeer: boolean): IntentionName {
  if (input.startsWith('peer:') && !allowPeer) throw new Error('cannot specify a peer here')
  const parts = input.split('/')
  if (parts.length > 3) throw new Error('input can contain at most two \'/\'')
  const first = parts[0] as string
  if (parts.length === 1 && first.startsWith('peer:')) throw new Error('need to specify the service name as well')
  const peer = parts.length > 1 && first.startsWith('peer:') ? first.slice('peer:'.length) : ''
  return { peer, name: parts[parts.length - 1] as string }
}

/** `?source=&destination=`, each exactly once and non-empty (`parseIntentionQueryExact`). */
export function exactQuery (query: URLSearchParams, allowPeer: boolean): { source: IntentionName, destination: IntentionName } {
  const one = (key: string): string => {
    const values = query.getAll(key)
    if (values.length !== 1 || values[0] === '') throw plain(`required query parameter '${key}' not set`)
    return values[0] as string
  }
  const sourceText = one('source')
  const destinationText = one('destination')
  const parse = (text: string, key: string, peer: boolean): IntentionName => {
    try {
      return parseIntentionName(text, peer)
    } catch (err) {
      throw plain(`${key} ${goQuote(text)} is invalid: ${(err as Error).message}`)
    }
  }
  return { source: parse(sourceText, 'source', allowPeer), destination: parse(destinationText, 'destination', false) }
}

/** The fields of an `Intention` body a write uses; everything else is read-only or ignored. */
interface IntentionBody {
  ID: string
  Description: string
  SourceName: string
  SourcePeer: string
  DestinationName: string
  SourceType: string
  Action: string
  Permissions: unknown
  Meta: Record<string, string>
  namespaces: string[]
}

function readBody (value: unknown): IntentionBody {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new TypeError(`json: cannot unmarshal ${Array.isArray(value) ? 'array' : value === null ? 'null' : typeof value} into Go value of type structs.Intention`)
  }
  const o = value as Json
  const str = (key: string): string => {
    const v = o[key]
    if (v === undefined || v === null) return ''
    if (typeof v !== 'string') throw new TypeError(`json: cannot unmarshal ${typeof v} into Go struct field Intention.${key} of type string`)
    return v
  }
  const meta = o.Meta
  if (meta !== undefined && meta !== null && (typeof meta !== 'object' || Array.isArray(meta) ||
    Object.values(meta).some((v) => typeof v !== 'string'))) {
    throw new TypeError('json: cannot unmarshal Meta into Go struct field Intention.Meta of type map[string]string')
  }
  return {
    ID: str('ID'),
    Description: str('Description'),
    SourceName: str('SourceName'),
    SourcePeer: str('SourcePeer'),
    DestinationName: str('DestinationName'),
    SourceType: str('SourceType'),
    Action: str('Action'),
    Permissions: o.Permissions,
    Meta: (meta ?? {}) as Record<string, string>,
    namespaces: ['SourceNS', 'DestinationNS', 'SourcePartition', 'DestinationPartition'].map(str)
  }
}

/** The `service-intentions` source an intention body becomes (`Intention.ToSourceIntention`). */
function toSource (body: IntentionBody, name: string, peer: string): Json {
  const source: Json = { Name: name }
  if (peer !== '') source.Peer = peer
  if (body.Action !== '') source.Action = body.Action
  if (body.Permissions !== undefined && body.Permissions !== null) source.Permissions = body.Permissions
  if (body.Description !== '') source.Description = body.Description
  source.Type = body.SourceType === '' ? 'consul' : body.SourceType
  return source
}

const sameSource = (src: Json, name: string, peer: string): boolean => src.Name === name && (src.Peer ?? '') === peer
const legacyKey = (destination: string, peer: string, source: string): string => `${destination}\u0000${peer}\u0000${source}`

/** The intention endpoints, writing through `store`. */
export class IntentionsApi {
  readonly #store: ConfigEntryStore
  /** IDs of intentions created through the legacy `POST` (Consul keeps them as the source's LegacyID). */
  readonly #legacyIds = new Map<string, string>()

  constructor (store: ConfigEntryStore) {
    this.#store = store
  }

  /** `GET /v1/connect/intentions`: every intention, in precedence order; `[]` when there is none. */
  list (): Intention[] {
    return this.#store.allIntentions().map((ixn) => this.#withId(ixn))
  }

  /**
   * `POST /v1/connect/intentions` (deprecated in Consul, still what older CLIs send): appends a
   * source to the destination's entry and answers its new legacy ID.
   */
  create (value: unknown, authorizeWrite: (destination: string) => void): { ID: string } {
    let body: IntentionBody
    try {
      body = readBody(value)
    } catch (err) {
      throw plain(`Failed to decode request body: ${(err as Error).message}`)
    }
    checkNamespaces(body)
    if (body.ID !== '') throw plain('ID must be empty when creating a new intention')
    if (body.SourceName === '') throw plain('SourceName must be set')
    if (body.DestinationName === '') throw plain('DestinationName must be set')
    if (Object.keys(body.Meta).length > 0) throw plain('Meta on a legacy intention is not supported by the fastify-consul-native dev agent; use PUT /v1/connect/intentions/exact')
    const destination = body.DestinationName
    authorizeWrite(destination)
    const existing = this.#sources(destination)
    this.#write(destination, [...(existing?.sources ?? []), toSource(body, body.SourceName, body.SourcePeer)], existing?.entry)
    const id = randomUUID()
    this.#legacyIds.set(legacyKey(destination, body.SourcePeer, body.SourceName), id)
    return { ID: id }
  }

  /** `GET /v1/connect/intentions/exact`: the intention, or 404 `Intention not found`. */
  get (source: IntentionName, destination: IntentionName): Intention {
    const found = this.#store.allIntentions().find((ixn) => ixn.DestinationName === destination.name &&
      ixn.SourceName === source.name && (ixn.SourcePeer ?? '') === source.peer)
    if (found === undefined) throw new DevAgentHttpError(404, 'Intention not found')
    return this.#withId(found)
  }

  /** `PUT /v1/connect/intentions/exact`: creates or replaces the source; the names come from the query. */
  put (source: IntentionName, destination: IntentionName, value: unknown, authorizeWrite: (destination: string) => void): true {
    let body: IntentionBody
    try {
      body = readBody(value)
    } catch (err) {
      throw new DevAgentHttpError(400, `Request decode failed: ${(err as Error).message}`)
    }
    checkNamespaces(body)
    authorizeWrite(destination.name)
    const existing = this.#sources(destination.name)
    if (Object.keys(body.Meta).length > 0) {
      if (existing === null) throw plain('Meta must not be specified')
      if (!sameMeta(existing.entry.Meta, body.Meta)) throw plain('Meta must not be specified, or should be unchanged during an update.')
    }
    const replaced = (existing?.sources ?? []).map((src) => sameSource(src, source.name, source.peer) ? null : src)
    const at = replaced.indexOf(null)
    const next = toSource(body, source.name, source.peer)
    const sources = at === -1 ? [...replaced, next] : replaced.map((src) => src ?? next)
    this.#write(destination.name, sources as Json[], existing?.entry)
    this.#legacyIds.delete(legacyKey(destination.name, source.peer, source.name))
    return true
  }

  /** `DELETE /v1/connect/intentions/exact`: idempotent; deleting the last source deletes the entry. */
  delete (source: IntentionName, destination: IntentionName, authorizeWrite: (destination: string) => void): true {
    authorizeWrite(destination.name)
    const existing = this.#sources(destination.name)
    if (existing === null || !existing.sources.some((src) => sameSource(src, source.name, source.peer))) return true
    const sources = existing.sources.filter((src) => !sameSource(src, source.name, source.peer))
    if (sources.length === 0) this.#store.delete(SERVICE_INTENTIONS, destination.name, null)
    else this.#write(destination.name, sources, existing.entry)
    this.#legacyIds.delete(legacyKey(destination.name, source.peer, source.name))
    return true
  }

  /**
   * `GET /v1/connect/intentions/check`: L4 only, like the authorize endpoint: an intention with
   * permissions counts as a deny, no match falls to the default.
   */
  check (query: URLSearchParams, defaults: AuthorizeDefaults): { Allowed: boolean } {
    const sourceType = query.get('source-type') ?? 'consul'
    for (const key of ['source', 'destination']) {
      if (query.getAll(key).length !== 1) throw plain(`required query parameter '${key}' not set`)
    }
    const parse = (key: string): IntentionName => {
      const text = query.get(key) as string
      try {
        return parseIntentionName(text, false)
      } catch (err) {
        throw plain(`${key} ${goQuote(text)} is invalid: ${(err as Error).message}`)
      }
    }
    const source = parse('source')
    const destination = parse('destination')
    if (sourceType !== 'consul') throw plain(`unsupported SourceType: ${goQuote(sourceType)}`)
    const decision: ConnectAuthorizeResponse = authorize({ namespace: 'default', service: source.name },
      this.#store.destinationIntentions(destination.name), defaults)
    return { Allowed: decision.Authorized }
  }

  /** A config-entry write or delete replaced the entry: its sources lose their legacy IDs, as in Consul. */
  forget (destination: string): void {
    for (const key of [...this.#legacyIds.keys()]) {
      if (key.startsWith(`${destination}\u0000`)) this.#legacyIds.delete(key)
    }
  }

  #withId (ixn: Intention): Intention {
    const id = this.#legacyIds.get(legacyKey(ixn.DestinationName, ixn.SourcePeer ?? '', ixn.SourceName))
    return id === undefined ? ixn : { ID: id, ...ixn }
  }

  /** The destination's entry as stored (rendered), with its sources; null when there is none. */
  #sources (destination: string): { entry: Json, sources: Json[] } | null {
    const entry = this.#store.get(SERVICE_INTENTIONS, destination)
    if (entry === null) return null
    return { entry, sources: (entry.Sources as Json[]).map((src) => ({ ...src })) }
  }

  /** Writes the entry through the store's full validation (the caller already checked the ACL). */
  #write (destination: string, sources: Json[], previous: Json | undefined): void {
    const entry: Json = { Kind: SERVICE_INTENTIONS, Name: destination, Sources: sources }
    if (previous?.JWT !== undefined) entry.JWT = previous.JWT
    if (previous?.Meta !== undefined) entry.Meta = previous.Meta
    this.#store.apply(entry, null, () => undefined)
  }
}

function checkNamespaces (body: IntentionBody): void {
  for (const value of body.namespaces) {
    if (value !== '' && value !== 'default') throw new DevAgentHttpError(400, 'Namespaces and partitions are a Consul Enterprise feature')
  }
}

function sameMeta (a: unknown, b: Record<string, string>): boolean {
  const have = (a ?? {}) as Record<string, string>
  const keys = Object.keys(b)
  return keys.length === Object.keys(have).length && keys.every((k) => have[k] === b[k])
}
