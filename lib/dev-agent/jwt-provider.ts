// `jwt-provider` config entries in the dev agent: Consul's JWTProviderConfigEntry.Validate, with
// its messages, and its JSON rendering (Go field order, `omitempty`, durations in nanoseconds).
// docs/semantics.md#config-entry-writes.
import type { DevAgentHttpError } from './http-error'

type Obj = Record<string, unknown>
type Invalid = (message: string) => DevAgentHttpError

const DISCOVERY_TYPES = new Set(['STRICT_DNS', 'STATIC', 'LOGICAL_DNS', 'EDS', 'ORIGINAL_DST'])

const sub = (o: Obj | null, k: string): Obj | null => (o?.[k] as Obj | undefined) ?? null
const s = (o: Obj | null, k: string): string => (o?.[k] as string | undefined) ?? ''
const n = (o: Obj | null, k: string): number => (o?.[k] as number | undefined) ?? 0
const count = (...present: boolean[]): number => present.filter(Boolean).length

/** Go's base64.StdEncoding.DecodeString succeeds (it skips CR and LF). */
function isBase64 (text: string): boolean {
  const t = text.replace(/[\r\n]/g, '')
  return t.length % 4 === 0 && /^[A-Za-z0-9+/]*={0,2}$/.test(t)
}

/** Validates a decoded, normalised entry; `validateMeta` runs where Consul checks Meta. */
export function validateJwtProvider (e: Obj, invalid: Invalid, validateMeta: () => void): void {
  if (s(e, 'Name') === '') throw invalid('Name is required')
  validateMeta()
  const jwks = sub(e, 'JSONWebKeySet')
  if (jwks === null) throw invalid('JSONWebKeySet is required')
  const local = sub(jwks, 'Local')
  const remote = sub(jwks, 'Remote')
  if (count(local !== null, remote !== null) !== 1) throw invalid('must specify exactly one of Local or Remote JSON Web key set')
  if (remote !== null) validateRemote(remote, invalid)
  else {
    const inline = s(local, 'JWKS')
    if (count(inline !== '', s(local, 'Filename') !== '') !== 1) throw invalid('must specify exactly one of String or filename for local keyset')
    if (inline !== '' && !isBase64(inline)) throw invalid('JWKS must be valid base64 encoded string')
  }
  const locationErrors: string[] = []
  for (const location of (e.Locations as Obj[] | undefined) ?? []) {
    const header = sub(location, 'Header')
    const query = sub(location, 'QueryParam')
    const cookie = sub(location, 'Cookie')
    if (count(header !== null, query !== null, cookie !== null) !== 1) locationErrors.push('must set exactly one of: JWT location header, query param or cookie')
    else if (header !== null && s(header, 'Name') === '') locationErrors.push('JWT location header name must be specified')
    else if (cookie !== null && s(cookie, 'Name') === '') locationErrors.push('JWT location cookie name must be specified')
    else if (query !== null && s(query, 'Name') === '') locationErrors.push('JWT location query param name must be specified')
  }
  if (locationErrors.length > 0) throw invalid(multiError(locationErrors))
  const forwarding = sub(e, 'Forwarding')
  if (forwarding !== null && s(forwarding, 'HeaderName') === '') throw invalid('Header name required for forwarding config')
}

function validateRemote (remote: Obj, invalid: Invalid): void {
  const uri = s(remote, 'URI')
  if (uri === '') throw invalid('Remote JWKS URI is required')
  // Go's url.ParseRequestURI: an absolute URI or an absolute path.
  if (!uri.startsWith('/') && !/^[A-Za-z][A-Za-z0-9+.-]*:/.test(uri)) {
    throw invalid(`Remote JWKS URI is invalid: parse ${JSON.stringify(uri)}: invalid URI for request, uri: ${uri}`)
  }
  const backoff = sub(sub(remote, 'RetryPolicy'), 'RetryPolicyBackOff')
  if (backoff !== null && n(backoff, 'MaxInterval') !== 0 && n(backoff, 'BaseInterval') > n(backoff, 'MaxInterval')) {
    throw invalid('retry policy backoff\'s MaxInterval should be greater or equal to BaseInterval')
  }
  const cluster = sub(remote, 'JWKSCluster')
  if (cluster === null) return
  const discovery = s(cluster, 'DiscoveryType')
  if (discovery !== '' && !DISCOVERY_TYPES.has(discovery)) throw invalid(`unsupported jwks cluster discovery type: ${JSON.stringify(discovery)}`)
  const tls = sub(cluster, 'TLSCertificates')
  if (tls === null) return
  const trusted = sub(tls, 'TrustedCA')
  if (count(sub(tls, 'CaCertificateProviderInstance') !== null, trusted !== null) !== 1) {
    throw invalid('must specify exactly one of: CaCertificateProviderInstance or TrustedCA for JKWS\' TLSCertificates')
  }
  if (trusted !== null && count(s(trusted, 'Filename') !== '', s(trusted, 'EnvironmentVariable') !== '',
    s(trusted, 'InlineString') !== '', s(trusted, 'InlineBytes') !== '') !== 1) {
    throw invalid('must specify exactly one of: Filename, EnvironmentVariable, InlineString or InlineBytes for JWKS\' TrustedCA')
  }
}

function multiError (errors: string[]): string {
  if (errors.length === 1) return `1 error occurred:\n\t* ${errors[0] as string}\n\n`
  return `${errors.length} errors occurred:\n\t${errors.map((e) => `* ${e}`).join('\n\t')}\n\n`
}

/** The non-zero fields of `o`, in the order given (Go's `omitempty`); a nested spec renders a sub-struct. */
type Shape = ReadonlyArray<string | readonly [string, Shape]>

function render (o: Obj | null, shape: Shape): Obj {
  const out: Obj = {}
  for (const field of shape) {
    if (typeof field === 'string') {
      const v = o?.[field]
      if (v !== undefined && v !== '' && v !== 0 && v !== false && !(Array.isArray(v) && v.length === 0)) out[field] = v
    } else {
      const child = sub(o, field[0])
      if (child !== null) out[field[0]] = render(child, field[1])
    }
  }
  return out
}

const REMOTE: Shape = ['URI', 'RequestTimeoutMs', 'CacheDuration', 'FetchAsynchronously',
  ['RetryPolicy', ['NumRetries', ['RetryPolicyBackOff', ['BaseInterval', 'MaxInterval']]]],
  ['JWKSCluster', ['DiscoveryType', ['TLSCertificates', [
    ['CaCertificateProviderInstance', ['InstanceName', 'CertificateName']],
    ['TrustedCA', ['Filename', 'EnvironmentVariable', 'InlineString', 'InlineBytes']]
  ]], 'ConnectTimeout']]]

export function renderJwtProvider (e: Obj): Obj {
  const out: Obj = { Kind: 'jwt-provider', Name: s(e, 'Name') }
  Object.assign(out, render(e, [['JSONWebKeySet', [['Local', ['JWKS', 'Filename']], ['Remote', REMOTE]]], 'Issuer', 'Audiences']))
  const locations = (e.Locations as Obj[] | undefined) ?? []
  if (locations.length > 0) {
    out.Locations = locations.map((l) => render(l, [['Header', ['Name', 'ValuePrefix', 'Forward']], ['QueryParam', ['Name']], ['Cookie', ['Name']]]))
  }
  const forwarding = sub(e, 'Forwarding')
  // PadForwardPayloadHeader has no `omitempty`.
  if (forwarding !== null) out.Forwarding = { ...render(forwarding, ['HeaderName']), PadForwardPayloadHeader: forwarding.PadForwardPayloadHeader === true }
  Object.assign(out, render(e, ['ClockSkewSeconds', ['CacheConfig', ['Size']], 'Meta']))
  if (out.Meta !== undefined && Object.keys(out.Meta as Obj).length === 0) delete out.Meta
  return out
}
