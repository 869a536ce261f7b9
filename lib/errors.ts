// Every failure a user can meet is one of these classes: a stable `code`, an HTTP status where it
// reaches a client, and a message that says what to fix. `instanceof` works per class.
import createError from '@fastify/error'

/** The last argument of every constructor: `{ cause }` is kept as the error's `cause`. */
type Cause = { cause?: unknown }

/** An option given to `register()` (or read from a CONSUL_* variable) is invalid. */
export const InvalidOptionError = createError<'FST_CONSUL_NATIVE_INVALID_OPTION', 500, [option: string, reason: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_INVALID_OPTION', 'Invalid fastify-consul-native option %s: %s', 500, TypeError)

/** The plugin was registered on a Fastify instance that was not created with `httpsOptions()`. */
export const NotHttpsError = createError<'FST_CONSUL_NATIVE_NOT_HTTPS', 500, []>(
  'FST_CONSUL_NATIVE_NOT_HTTPS',
  'fastify-consul-native needs an HTTPS server created with httpsOptions(): use Fastify({ https: httpsOptions() })', 500)

/** The plugin was registered inside an encapsulated plugin: its TLS settings are server-wide, so its checks must be too. */
export const NotRootError = createError<'FST_CONSUL_NATIVE_NOT_ROOT', 500, []>(
  'FST_CONSUL_NATIVE_NOT_ROOT',
  'fastify-consul-native must be registered on the root instance (the TLS server is shared by every route), not inside an encapsulated plugin', 500)

/** The first leaf, roots or intentions could not be loaded from the agent within `readyTimeout`. */
export const NotReadyError = createError<'FST_CONSUL_NATIVE_NOT_READY', 503, [timeoutMs: number, reason: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_NOT_READY', 'Consul agent not ready after %sms: %s', 503)

/** The agent answered with a non-2xx status. */
export const AgentResponseError = createError<'FST_CONSUL_NATIVE_AGENT_ERROR', 502, [method: string, path: string, status: number, reason: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_AGENT_ERROR', 'Consul agent answered %s %s with %s: %s', 502)

/** The agent answered 2xx with a body that is not the documented shape. */
export const AgentInvalidResponseError = createError<'FST_CONSUL_NATIVE_AGENT_INVALID_RESPONSE', 502, [request: string, reason: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_AGENT_INVALID_RESPONSE', 'Consul agent answered %s with an invalid body: %s', 502)

/** A certificate source other than the agent failed: a Consul server's gRPC CA service, or the certificate files. */
export const CertificateSourceError = createError(
  'FST_CONSUL_NATIVE_CERTIFICATE_SOURCE', 'Certificate source %s: %s', 502)

/** The agent could not be reached (connection refused, timeout, TLS failure). */
export const AgentUnreachableError = createError<'FST_CONSUL_NATIVE_AGENT_UNREACHABLE', 503, [agent: string, reason: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_AGENT_UNREACHABLE', 'Consul agent unreachable at %s: %s', 503)

/** An intention update could not be compiled (for example a regex RE2 rejects); the last good set stays. */
export const InvalidIntentionsError = createError<'FST_CONSUL_NATIVE_INVALID_INTENTIONS', 500, [intention: string, reason: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_INVALID_INTENTIONS', 'Intention %s cannot be enforced: %s', 500)

/** A route's `config.consulNative` is neither `false` nor a valid override. */
export const InvalidRouteConfigError = createError<'FST_CONSUL_NATIVE_INVALID_ROUTE_CONFIG', 500, [route: string, reason: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_INVALID_ROUTE_CONFIG', 'Invalid config.consulNative on route %s: %s', 500, TypeError)

// The four answers to a refused request below carry no stack trace: it would only ever point at
// the plugin's hook (the log line says why the request was refused), and capturing it cost about
// 3 µs per refused request.
const NO_STACK = false

/** The request carries no verified Consul service identity. */
export const UnauthenticatedError = createError<'FST_CONSUL_NATIVE_UNAUTHENTICATED', 401, []>(
  'FST_CONSUL_NATIVE_UNAUTHENTICATED', 'A verified Consul service certificate is required', 401, Error, NO_STACK)

/** The caller's identity is verified but intentions deny the request. */
export const DeniedError = createError<'FST_CONSUL_NATIVE_DENIED', 403, []>(
  'FST_CONSUL_NATIVE_DENIED', 'Access denied', 403, Error, NO_STACK)

/** The request path is rejected by the mesh request normalization (for example an escaped slash). */
export const BadPathError = createError<'FST_CONSUL_NATIVE_BAD_PATH', 400, []>(
  'FST_CONSUL_NATIVE_BAD_PATH', 'The request path is not acceptable', 400, Error, NO_STACK)

/** A header name carries an underscore and the mesh entry says `HeadersWithUnderscoresAction: REJECT_REQUEST`. */
export const BadHeaderError = createError<'FST_CONSUL_NATIVE_BAD_HEADER', 400, []>(
  'FST_CONSUL_NATIVE_BAD_HEADER', 'A request header is not acceptable', 400, Error, NO_STACK)

/** The agent refused to register the service (or could not be reached to do it). */
export const RegisterFailedError = createError<'FST_CONSUL_NATIVE_REGISTER_FAILED', 500, [service: string, reason: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_REGISTER_FAILED', 'Consul agent refused to register service %s: %s', 500)

/** Outbound call: discovery found no (healthy) mesh instance of the target service, or could not ask the agent. */
export const NoInstancesError = createError<'FST_CONSUL_NATIVE_NO_INSTANCES', 503, [service: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_NO_INSTANCES', 'No healthy instance of service %s', 503)

/** Outbound call: the instance dialled did not present the target service's SPIFFE identity. */
export const PeerMismatchError = createError<'FST_CONSUL_NATIVE_PEER_MISMATCH', 502, [service: string, presented: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_PEER_MISMATCH', 'Service %s answered with identity %s', 502)

/** Outbound call: `fetch()`'s `timeout` (the whole call) or `headersTimeout` expired. */
export const OutboundTimeoutError = createError<'FST_CONSUL_NATIVE_TIMEOUT', 504, [service: string, reason: string, options?: Cause]>(
  'FST_CONSUL_NATIVE_TIMEOUT', 'Outbound call to service %s timed out: %s', 504)
