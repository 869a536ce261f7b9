// Consul's SPIFFE identities (docs/semantics.md#spiffe-ids): parsing a peer certificate's URI SAN into an
// identity, building service IDs, and splitting Node's `subjectAltName` string. Pure, no I/O.

export type ConsulSpiffeId =
  | { kind: 'service', trustDomain: string, partition: string, namespace: string, datacenter: string, service: string }
  | { kind: 'agent', trustDomain: string, partition: string, datacenter: string, node: string }
  | { kind: 'mesh-gateway', trustDomain: string, partition: string, datacenter: string }
  | { kind: 'server', trustDomain: string, datacenter: string }
  | { kind: 'signing', trustDomain: string }

export interface ServiceIdentityParts {
  /** Omitted from the URI when absent or `default` (any case); lowercased otherwise. */
  partition?: string | undefined
  /** `default` when absent. */
  namespace?: string | undefined
  datacenter: string
  service: string
}

export interface SubjectAltNames {
  /** Every URI SAN in certificate order, decoded when Node printed it quoted. */
  uris: string[]
  /**
   * How many of `uris` Node had to print as JSON string literals because they contain a comma,
   * quote, backslash or a non-printable character. A valid Consul SPIFFE ID never does, so a
   * caller that authenticates peers should reject a certificate when this is not 0.
   */
  quotedUris: number
  /** SAN entries of any other type (DNS, IP Address, email, ...). */
  others: number
}

const SCHEME = 'spiffe://'
const DEFAULT = 'default'
// SPIFFE trust domains are letters, digits, '.', '-', '_'; this also rules out userinfo, port,
// query, fragment and escapes in the authority.
const TRUST_DOMAIN = /^[A-Za-z0-9._-]+$/
// One non-empty RFC 3986 path segment (pchar+). The alternatives start with different characters,
// so matching is linear.
const PATH_SEGMENT = /^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+$/

/**
 * Parses one of Consul's SPIFFE ID formats. Returns `null` for anything else: another scheme
 * (the scheme must be lowercase `spiffe`, as Envoy's principal match is case-sensitive), userinfo,
 * port, query, fragment, empty or malformed segments, a trailing slash, unknown paths. Path segments
 * are percent-decoded; the trust domain is lowercased; the partition is `default` when absent.
 */
export function parseSpiffeId (uri: string): ConsulSpiffeId | null {
  if (!uri.startsWith(SCHEME)) return null
  const slash = uri.indexOf('/', SCHEME.length)
  const host = slash === -1 ? uri.slice(SCHEME.length) : uri.slice(SCHEME.length, slash)
  if (!TRUST_DOMAIN.test(host)) return null
  const trustDomain = host.toLowerCase()
  if (slash === -1) return { kind: 'signing', trustDomain }

  const raw = uri.slice(slash + 1).split('/')
  const segments: string[] = []
  for (const segment of raw) {
    if (!PATH_SEGMENT.test(segment)) return null
    const decoded = segment.includes('%') ? decodeURIComponentOrNull(segment) : segment
    if (decoded === null) return null
    segments.push(decoded)
  }

  // Keywords are compared on the raw segments, so an escaped keyword (`%6es`) is not one.
  let partition = DEFAULT
  let at = 0
  if (raw[0] === 'ap' && raw.length >= 2) {
    partition = segments[1] as string
    at = 2
  }
  const rest = raw.slice(at)
  const value = (i: number): string => segments[at + i] as string
  const shape = rest.map((segment, i) => i % 2 === 0 ? segment : '*').join('/')

  switch (shape) {
    case 'ns/*/dc/*/svc/*':
      return { kind: 'service', trustDomain, partition, namespace: value(1), datacenter: value(3), service: value(5) }
    case 'agent/*/dc/*/id/*':
      if (rest[1] !== 'client') return null
      return { kind: 'agent', trustDomain, partition, datacenter: value(3), node: value(5) }
    case 'gateway/*/dc/*':
      if (rest[1] !== 'mesh') return null
      return { kind: 'mesh-gateway', trustDomain, partition, datacenter: value(3) }
    case 'agent/*/dc/*':
      if (rest[1] !== 'server' || at !== 0) return null
      return { kind: 'server', trustDomain, datacenter: value(3) }
    default:
      return null
  }
}

/**
 * Builds a service SPIFFE ID as Consul does: `/ap/<partition>` only for a non-default partition
 * (lowercased), namespace `default` when absent. Segments are percent-encoded so that
 * `parseSpiffeId` returns exactly the given names.
 */
export function serviceSpiffeId (trustDomain: string, parts: ServiceIdentityParts): string {
  const partition = parts.partition?.toLowerCase()
  const namespace = parts.namespace ?? DEFAULT
  for (const [name, value] of [['namespace', namespace], ['datacenter', parts.datacenter], ['service', parts.service]]) {
    if (value === '') throw new TypeError(`SPIFFE ID ${name} must not be empty`)
  }
  if (!TRUST_DOMAIN.test(trustDomain)) throw new TypeError(`Invalid SPIFFE trust domain: ${JSON.stringify(trustDomain)}`)
  const ap = partition === undefined || partition === '' || partition === DEFAULT ? '' : `/ap/${encodeURIComponent(partition)}`
  return `${SCHEME}${trustDomain.toLowerCase()}${ap}/ns/${encodeURIComponent(namespace)}` +
    `/dc/${encodeURIComponent(parts.datacenter)}/svc/${encodeURIComponent(parts.service)}`
}

/**
 * Splits Node's `X509Certificate#subjectAltName` (`TYPE:value` entries joined by `, `). Since
 * CVE-2021-44532 Node prints any value containing `,`, `"`, `\`, `'` or a control character as a
 * JSON string literal, so the list splits unambiguously; anything that does not follow that
 * grammar returns `null`. `undefined` (no SAN extension) gives empty lists.
 */
export function parseSubjectAltNames (san: string | undefined): SubjectAltNames | null {
  const result: SubjectAltNames = { uris: [], quotedUris: 0, others: 0 }
  if (san === undefined || san === '') return result
  let at = 0
  while (true) {
    const colon = san.indexOf(':', at)
    if (colon === -1) return null
    const type = san.slice(at, colon)
    if (!SAN_TYPE.test(type)) return null
    let value: string
    let quoted = false
    let end: number
    if (san.charCodeAt(colon + 1) === QUOTE) {
      end = endOfJsonString(san, colon + 1)
      if (end === -1) return null
      const literal = decodeJsonString(san.slice(colon + 1, end))
      if (literal === null) return null
      value = literal
      quoted = true
    } else {
      end = san.indexOf(SEPARATOR, colon + 1)
      if (end === -1) end = san.length
      value = san.slice(colon + 1, end)
      // Node quotes every value containing these, so finding one means the string is not Node's.
      if (value.includes('"') || value.includes(',')) return null
    }
    if (type === 'URI') {
      result.uris.push(value)
      if (quoted) result.quotedUris++
    } else {
      result.others++
    }
    if (end === san.length) return result
    if (!san.startsWith(SEPARATOR, end)) return null
    at = end + SEPARATOR.length
  }
}

const SAN_TYPE = /^[A-Za-z][A-Za-z0-9 ]*$/
const SEPARATOR = ', '
const QUOTE = 0x22
const BACKSLASH = 0x5c

/** Index just past the closing quote of the JSON string literal that starts at `start`, or -1. */
function endOfJsonString (text: string, start: number): number {
  for (let i = start + 1; i < text.length; i++) {
    const code = text.charCodeAt(i)
    if (code === BACKSLASH) i++
    else if (code === QUOTE) return i + 1
  }
  return -1
}

function decodeJsonString (literal: string): string | null {
  try {
    return JSON.parse(literal) as string
  } catch {
    return null
  }
}

function decodeURIComponentOrNull (segment: string): string | null {
  try {
    return decodeURIComponent(segment)
  } catch {
    // A %XX sequence that is not UTF-8 (e.g. `%ff`).
    return null
  }
}
