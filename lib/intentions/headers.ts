// What the application reads of a request's headers, so that header matchers read the same
// (docs/semantics.md#transport-headers): Node keeps some names single-valued (the application sees
// the first value only), and Fastify reads `host` before HTTP/2's `:authority`. A header matcher
// that meets a second value of such a name, or a `host` that disagrees with `:authority`, decides
// on what the application reads and records the ambiguity here; the request decision then rejects
// the request (400). Nothing is checked for headers no matcher reads: they cannot change a decision.

/** Bits of `singleValued()`: Node keeps the name single-valued over HTTP/1.1, over HTTP/2. */
export const SINGLE_HTTP1 = 1
export const SINGLE_HTTP2 = 2

/** Names Node's HTTP/1.1 `IncomingMessage` keeps single-valued (later values are dropped from `req.headers`). */
const HTTP1_SINGLE = new Set([
  'age', 'authorization', 'content-length', 'content-type', 'etag', 'expires', 'from', 'host',
  'if-modified-since', 'if-unmodified-since', 'last-modified', 'location', 'max-forwards',
  'proxy-authorization', 'referer', 'retry-after', 'server', 'user-agent'
])

/** The same for Node's HTTP/2 compatibility layer (its `kSingleValueHeaders`); nghttp2 itself rejects repeated pseudo-headers. */
const HTTP2_SINGLE = new Set([
  ':authority', ':method', ':path', ':protocol', ':scheme',
  'access-control-allow-credentials', 'access-control-max-age', 'access-control-request-method', 'age',
  'authorization', 'content-encoding', 'content-language', 'content-length', 'content-location', 'content-md5',
  'content-range', 'content-type', 'date', 'dnt', 'etag', 'expires', 'from', 'host', 'if-match',
  'if-modified-since', 'if-none-match', 'if-range', 'if-unmodified-since', 'last-modified', 'location',
  'max-forwards', 'proxy-authorization', 'range', 'referer', 'retry-after', 'tk', 'upgrade-insecure-requests',
  'user-agent', 'x-content-type-options'
])

/** `SINGLE_HTTP1 | SINGLE_HTTP2` bits for a lower-case header name; computed when a matcher is compiled. */
export function singleValued (lname: string): number {
  return (HTTP1_SINGLE.has(lname) ? SINGLE_HTTP1 : 0) | (HTTP2_SINGLE.has(lname) ? SINGLE_HTTP2 : 0)
}

/**
 * The ambiguity met by the matchers during one decision, as the reason to reject the request;
 * null when none. Decisions are synchronous: the request decision clears it before deciding and
 * reads it after.
 */
export const headerAmbiguity: { reason: string | null } = { reason: null }

export const AUTHORITY_MISMATCH_REASON = 'HTTP/2 host header differs from :authority'

/**
 * Whether `rawHeaders` (Node's `req.rawHeaders`) came over HTTP/2: there, pseudo-headers come first
 * (nghttp2 enforces it), and an HTTP/1.1 header name cannot start with ':' (llhttp rejects it).
 */
export function isHttp2 (rawHeaders: readonly string[]): boolean {
  return rawHeaders.length > 0 && (rawHeaders[0] as string).charCodeAt(0) === 58
}

/** Records that single-valued header `lname` was sent more than once. */
export function recordRepeated (lname: string): void {
  headerAmbiguity.reason = `header ${lname} sent more than once`
}

/** ASCII case-insensitive equality of a raw header name with a lower-case name. */
export function nameIs (name: string, lname: string): boolean {
  if (name.length !== lname.length) return false
  for (let i = 0; i < name.length; i++) {
    let c = name.charCodeAt(i)
    if (c >= 65 && c <= 90) c += 32
    if (c !== lname.charCodeAt(i)) return false
  }
  return true
}
