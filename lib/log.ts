// Every log line of the plugin has one shape, from one child logger (docs/semantics.md#log-shape):
//   { plugin: 'fastify-consul-native', consulNative: { event, ...fields }, err?, reqId? }
// with the message 'fastify-consul-native: ...'. Lines about a request carry the request's id
// under Fastify's label, and are not silenced by a route's logLevel: a denial is a security fact.
// LOG_EVENTS lists every event with its fields: the README's table is checked against it, and
// logEvent() accepts no other event and no other field.
import type { EventEmitter } from 'node:events'
import type { FastifyBaseLogger } from 'fastify'

export const PLUGIN_NAME = 'fastify-consul-native'

/** The levels the plugin logs at. */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error'

/** What logEvent() writes to: Fastify's logger, a request's logger, or a test double. */
export type EventSink = { readonly [L in LogLevel]: (obj: object, msg: string) => void }

const REQUEST_FIELDS = ['source', 'route', 'method', 'path', 'reason'] as const
const LIMITED_FIELDS = [...REQUEST_FIELDS, 'suppressed'] as const

/** Every event, with the fields its `consulNative` object may carry (`err` sits beside it). */
export const LOG_EVENTS = {
  // Requests (through request.log)
  allowed: REQUEST_FIELDS,
  denied: [...LIMITED_FIELDS, 'jwt'],
  unauthenticated: LIMITED_FIELDS,
  'bad-path': LIMITED_FIELDS,
  'bad-header': LIMITED_FIELDS,
  'shadow-denied': [...LIMITED_FIELDS, 'jwt'],
  'shadow-unauthenticated': LIMITED_FIELDS,
  'denials-suppressed': ['suppressed'],
  'candidate-disagrees': ['source', 'route', 'method', 'path', 'live', 'liveReason', 'candidate', 'candidateReason', 'suppressed'],
  'no-decision': ['route', 'method', 'path'],
  'upgrade-revoked': ['source', 'path'],
  'upgrade-recheck-failed': ['err'],
  // Plugin setup and Fastify
  'case-insensitive-router': [],
  'router-callback-unchecked': ['option'],
  'server-bindings-unknown': [],
  'check-continue-taken': [],
  // Agent watches (leaf, roots, intentions, config entries, outbound discovery)
  'watch-updated': ['watch', 'index', 'previousIndex'],
  'watch-index-reset': ['watch', 'index', 'previousIndex'],
  'watch-failed': ['watch', 'index', 'failures', 'retryInMs', 'err'],
  'watch-rejected': ['watch', 'index', 'previousIndex', 'err'],
  'watch-recovered': ['watch', 'index'],
  'listener-failed': ['watch', 'listenerEvent', 'err'],
  // What the watches feed
  'tls-rotated': ['serial', 'validBefore', 'previousSerial', 'previousValidBefore', 'roots', 'activeRootId'],
  'leaf-held': ['serial', 'reason'],
  'policy-updated': ['count', 'index', 'protocol'],
  'intention-unsupported': ['reason'],
  'default-policy-unknown': ['reason', 'header'],
  'leaf-expiring': ['serial', 'validBefore', 'msLeft', 'cause'],
  'certificate-files-unwatched': ['dir', 'reason'],
  'certificate-files-recovered': ['serial'],
  'certificate-files-rejected': ['part', 'reason'],
  'certificate-files-rejected-again': ['part', 'reason'],
  'certificate-source-failed': ['source', 'part', 'address', 'failures', 'serial', 'err'],
  'certificate-source-recovered': ['source', 'part'],
  'certificate-source-stopped': ['source'],
  // JWT providers and key sets (docs/semantics.md#jwt-providers)
  'jwt-provider-missing': ['provider'],
  'jwks-failed': ['provider', 'reason', 'keptLastGood'],
  'jwks-recovered': ['provider'],
  // Registration
  registered: ['serviceId', 'address', 'port', 'checkId'],
  'register-failed': ['err'],
  'registration-restored': ['serviceId'],
  'registration-check-failed': ['serviceId', 'retryInMs', 'err'],
  'ttl-update-failed': ['serviceId', 'retryInMs', 'err'],
  'registration-recovered': ['serviceId', 'loop'],
  deregistered: ['serviceId', 'alreadyGone'],
  'deregister-failed': ['serviceId', 'err'],
  'deregister-after-registration': ['serviceId'],
  // Outbound calls
  'outbound-retry': ['service', 'instance', 'err'],
  'outbound-identity-refused': ['service', 'instance', 'err'],
  // Routes and rollout
  'route-path-rule': ['route'],
  'candidate-loaded': ['source', 'count'],
  'candidate-rejected': ['source', 'reason']
} as const satisfies Record<string, readonly string[]>

export type LogEvent = keyof typeof LOG_EVENTS

/** The fields of one event (all optional; `err` is passed apart). */
export type EventFields<E extends LogEvent> = { readonly [K in Exclude<(typeof LOG_EVENTS)[E][number], 'err'>]?: unknown }

/** The plugin's child logger: every line it writes carries `plugin`. */
export function pluginLogger (log: FastifyBaseLogger): FastifyBaseLogger {
  return log.child({ plugin: PLUGIN_NAME })
}

/**
 * Writes one line in the plugin's shape to the plugin's logger. `err` goes beside `consulNative`,
 * where Fastify's serializer expects it; `request` adds the request id under `[label]`.
 */
export function logEvent<E extends LogEvent> (sink: EventSink, level: LogLevel, event: E, fields: EventFields<E> | null,
  message: string, err?: unknown, request?: { readonly label: string, readonly id: unknown }): void {
  const line: Record<string, unknown> = { consulNative: fields === null ? { event } : { event, ...fields } }
  if (err !== undefined) line.err = err
  if (request !== undefined) line[request.label] = request.id
  sink[level](line, `${PLUGIN_NAME}: ${message}`)
}

/**
 * Emits `event` to each listener in turn, each in its own try: one that throws is logged
 * (`listener-failed`) and the listeners after it still run, which EventEmitter#emit would not do.
 */
export function emitToEach (emitter: EventEmitter, event: string, payload: unknown, sink: EventSink): void {
  // rawListeners: a once() listener is called through its wrapper, which removes it.
  for (const listener of emitter.rawListeners(event) as Array<(payload: unknown) => void>) {
    try {
      listener.call(emitter, payload)
    } catch (err) {
      logEvent(sink, 'error', 'listener-failed', { listenerEvent: event }, 'an event listener threw', err as Error)
    }
  }
}
