// `POST /v1/agent/connect/authorize` (docs/semantics.md#authorize): the first intention, in precedence order,
// whose source matches the caller decides; an L7 intention always answers false; without a match
// the default applies. Reasons are Consul's, verbatim (test/fixtures/consul/agent-authorize.txt).
import type { ConnectAuthorizeResponse, Intention } from '../agent/wire'
import { pathUnescape } from './go'
import { DevAgentHttpError } from './http-error'

export type CertURI =
  | { kind: 'service', host: string, partition: string, namespace: string, datacenter: string, service: string }
  | { kind: 'other' }

const SERVICE_PATH = /^(?:\/ap\/([^/]+))?\/ns\/([^/]+)\/dc\/([^/]+)\/svc\/([^/]+)$/
const OTHER_PATHS = [
  /^(?:\/ap\/[^/]+)?\/agent\/client\/dc\/[^/]+\/id\/[^/]+$/,
  /^\/agent\/server\/dc\/[^/]+$/,
  /^(?:\/ap\/[^/]+)?\/gateway\/mesh\/dc\/[^/]+$/
]
// Characters Go's url.Parse accepts in a host (unreserved, sub-delims, ':', brackets, escapes).
const HOST = /^[A-Za-z0-9\-._~!$&'()*+,;=:[\]<>"%]*$/
const BAD_ESCAPE = /%(?![0-9A-Fa-f]{2})/

/**
 * Parses a certificate URI as Consul's agent does (`connect.ParseCertURIFromString`): Go's
 * url.Parse (scheme case-insensitive, query and fragment ignored), then the SPIFFE path formats on
 * the raw path, unescaping the parts when the path had escapes. Returns null when the agent would
 * answer "not a valid Connect identifier".
 */
export function parseCertURI (uri: string): CertURI | null {
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(uri)) return null
  const scheme = /^([A-Za-z][A-Za-z0-9+.-]*):/.exec(uri)
  if (scheme === null || (scheme[1] as string).toLowerCase() !== 'spiffe') return null
  let rest = uri.slice(scheme[0].length)
  const hash = rest.indexOf('#')
  if (hash !== -1) {
    if (BAD_ESCAPE.test(rest.slice(hash + 1))) return null
    rest = rest.slice(0, hash)
  }
  const question = rest.indexOf('?')
  if (question !== -1) rest = rest.slice(0, question)
  if (!rest.startsWith('//')) return null // an opaque URI has neither host nor path
  const slash = rest.indexOf('/', 2)
  const authority = slash === -1 ? rest.slice(2) : rest.slice(2, slash)
  const path = slash === -1 ? '' : rest.slice(slash)
  const host = authority.slice(authority.lastIndexOf('@') + 1)
  if (!HOST.test(host) || BAD_ESCAPE.test(host) || BAD_ESCAPE.test(path)) return null
  const escaped = path.includes('%')
  const service = SERVICE_PATH.exec(path)
  if (service !== null) {
    const parts = service.slice(1).map((part) => part === undefined ? '' : escaped ? pathUnescape(part) : part)
    const [partition, namespace, datacenter, name] = parts as [string, string, string, string]
    return { kind: 'service', host, partition, namespace, datacenter, service: name }
  }
  if (OTHER_PATHS.some((re) => re.test(path)) || (path === '' && host.indexOf('.') > 0)) return { kind: 'other' }
  return null
}

/** Consul's `Intention.String()`. */
export function intentionString (ixn: Intention): string {
  const source = ixn.SourcePeer !== undefined && ixn.SourcePeer !== ''
    ? `peer(${ixn.SourcePeer})/`
    : ixn.SourcePartition !== undefined && ixn.SourcePartition !== '' ? `${ixn.SourcePartition}/` : ''
  const destination = ixn.DestinationPartition !== undefined && ixn.DestinationPartition !== '' ? `${ixn.DestinationPartition}/` : ''
  const id = ixn.ID !== undefined && ixn.ID !== '' ? `ID: ${ixn.ID}, ` : ''
  const detail = ixn.Permissions !== undefined && ixn.Permissions.length > 0
    ? `Permissions: ${ixn.Permissions.length}`
    : `Action: ${(ixn.Action ?? '').toUpperCase()}`
  return `${source}${ixn.SourceNS}/${ixn.SourceName} => ${destination}${ixn.DestinationNS}/${ixn.DestinationName} (${id}Precedence: ${ixn.Precedence}, ${detail})`
}

export interface AuthorizeDefaults {
  /** The agent's `default_intention_policy`; when set it decides (reason `Default intention policy`). */
  defaultIntentionPolicy: 'allow' | 'deny' | undefined
  aclsEnabled: boolean
  /** With ACLs on: the caller's token authorizer's intention default (allow for a management token). */
  tokenDefaultAllow: boolean
}

/** Validates the request before any ACL check, as Consul does; returns the caller's identity. */
export function parseAuthorizeRequest (target: string, clientCertURI: string): CertURI & { kind: 'service' } {
  if (target === '') throw new DevAgentHttpError(400, 'Bad request: Target service must be specified')
  const uri = parseCertURI(clientCertURI)
  if (uri === null) throw new DevAgentHttpError(400, 'Bad request: ClientCertURI not a valid Connect identifier')
  if (uri.kind !== 'service') throw new DevAgentHttpError(400, 'Bad request: ClientCertURI not a valid Service identifier')
  return uri
}

/**
 * The decision for `caller` against the destination's intentions (already in precedence order).
 * The trust domain and datacenter of the URI are ignored, as Consul ignores them; partitions are
 * ignored as in Consul CE (where every partition equals `default`).
 */
export function authorize (
  caller: { namespace: string, service: string },
  intentions: readonly Intention[],
  defaults: AuthorizeDefaults
): ConnectAuthorizeResponse {
  const match = intentions.find((ixn) =>
    (ixn.SourcePeer ?? '') === '' &&
    (ixn.SourceSamenessGroup ?? '') === '' &&
    (ixn.SourceNS === '*' || ixn.SourceNS === caller.namespace) &&
    (ixn.SourceName === '*' || ixn.SourceName === caller.service))
  if (match !== undefined) {
    if (match.Permissions === undefined || match.Permissions.length === 0) {
      return { Authorized: match.Action === 'allow', Reason: `Matched L4 intention: ${intentionString(match)}` }
    }
    // The endpoint cannot judge L7 permissions, so it treats them as deny.
    return { Authorized: false, Reason: `Matched L7 intention: ${intentionString(match)}` }
  }
  if (defaults.defaultIntentionPolicy !== undefined) {
    return { Authorized: defaults.defaultIntentionPolicy === 'allow', Reason: 'Default intention policy' }
  }
  if (!defaults.aclsEnabled) {
    // Consul 1.10's wording, as a real 1.10 agent answered; newer versions say "Default behavior configured by ACLs".
    return { Authorized: true, Reason: 'ACLs disabled, access is allowed by default' }
  }
  return { Authorized: defaults.tokenDefaultAllow, Reason: 'Default behavior configured by ACLs' }
}
