// Explain (docs/semantics.md#rollout-explain): one request decided by the same pure call the
// request hook makes (lib/intentions/request.ts), with a trace sink collecting every step in
// precedence order. Nothing here decides: it only records and names what the engine did.
import { InvalidOptionError } from './errors'
import { canonicalPath } from './intentions/path'
import type { CallerIdentity, DecisionTrace, PermissionMismatch } from './intentions/policy'
import { decideRequest, newVerdict } from './intentions/request'
import type { RequestOutcome, RouteRules, ServiceRules } from './intentions/request'
import { parseSpiffeId } from './spiffe'

/** What to explain: a caller and a request. */
export interface ExplainInput {
  /** A service name (`web`, `ns/web`, `partition/ns/web`) or a SPIFFE ID (`spiffe://…/ns/default/dc/dc1/svc/web`). */
  source: string
  method: string
  /** The request target as sent: path and optional query. */
  path: string
  headers?: Record<string, string | readonly string[]>
  /** A route as declared (`/admin`, `/items/:id`): its `config.consulNative` is included. */
  route?: string
}

/** One step of the decision, in the order the engine took it. */
export type TraceStep =
  | { step: 'route', route: string, exempt: boolean, overrides: number }
  | { step: 'normalization', path: string | null, rejected: 'path' | 'header' | null }
  | { step: 'source', scope: 'route' | 'service', intention: string, matched: boolean }
  | { step: 'permission', intention: string, permission: number, action: 'allow' | 'deny', path: string, matched: boolean, failed?: PermissionMismatch, header?: string }
  | { step: 'default', reason: string }

export interface Explanation {
  allow: boolean
  reason: string
  outcome: Exclude<RequestOutcome, 'ask-agent'>
  /** What decided: an intention (or route override source) and its permission, or the default policy; null for outcomes before intentions. */
  decidedBy: { intention: string | null, permission: number | null, defaultPolicy: boolean } | null
  trace: TraceStep[]
}

/**
 * Parses `source`; throws FST_CONSUL_NATIVE_INVALID_OPTION with what is wrong. Null: a SPIFFE ID
 * of another trust domain than `trustDomain` (when known), which no request could carry verified.
 */
export function parseSource (source: unknown, trustDomain: string | null = null): CallerIdentity | null {
  if (typeof source !== 'string' || source === '') throw new InvalidOptionError('explain.source', 'must be a service name or a SPIFFE ID')
  if (source.startsWith('spiffe://')) {
    const id = parseSpiffeId(source)
    if (id?.kind !== 'service') throw new InvalidOptionError('explain.source', `${JSON.stringify(source)} is not a Consul service SPIFFE ID`)
    if (trustDomain !== null && id.trustDomain !== trustDomain.toLowerCase()) return null
    return { partition: id.partition, namespace: id.namespace, service: id.service }
  }
  const parts = source.split('/')
  if (parts.length > 3 || parts.some((p) => p === '' || p.includes('*'))) {
    throw new InvalidOptionError('explain.source', `${JSON.stringify(source)} must be "name", "namespace/name" or "partition/namespace/name"`)
  }
  const [service, namespace = 'default', partition = 'default'] = parts.reverse() as [string, string?, string?]
  return { partition, namespace, service }
}

/** Node's rawHeaders form of a headers object. */
export function rawHeadersOf (headers: ExplainInput['headers']): string[] {
  const raw: string[] = []
  if (headers === undefined) return raw
  if (headers === null || typeof headers !== 'object') throw new InvalidOptionError('explain.headers', 'must be an object of header names to values')
  for (const [name, value] of Object.entries(headers)) {
    for (const v of typeof value === 'string' ? [value] : value) {
      if (typeof v !== 'string') throw new InvalidOptionError('explain.headers', `${name} must be a string or an array of strings`)
      raw.push(name, v)
    }
  }
  return raw
}

/** Collects the engine's steps. */
class Recorder implements DecisionTrace {
  readonly steps: TraceStep[] = []

  source (scope: 'route' | 'service', intention: string, matched: boolean): void {
    this.steps.push({ step: 'source', scope, intention, matched })
  }

  permission (intention: string, permission: number, action: 'allow' | 'deny', path: string, failed: PermissionMismatch | null, header: string | null): void {
    const step: TraceStep = { step: 'permission', intention, permission, action, path, matched: failed === null }
    if (failed !== null) step.failed = failed
    if (header !== null) step.header = header
    this.steps.push(step)
  }
}

/**
 * Decides `input` with `service` and `route` exactly as the request hook would (the caller is
 * taken as verified, unless its SPIFFE ID is of another trust domain than `trustDomain`), and
 * returns the decision with its trace.
 */
export function explainRequest (service: ServiceRules, route: RouteRules, routeName: string | null, input: ExplainInput,
  trustDomain: string | null = null): Explanation {
  if (input === null || typeof input !== 'object') throw new InvalidOptionError('explain', 'takes { source, method, path, headers?, route? }')
  const caller = parseSource(input.source, trustDomain)
  if (typeof input.method !== 'string' || input.method === '') throw new InvalidOptionError('explain.method', 'must be an HTTP method such as "GET"')
  if (typeof input.path !== 'string' || input.path === '') throw new InvalidOptionError('explain.path', 'must be a request path such as "/admin"')
  const rawHeaders = rawHeadersOf(input.headers)
  const recorder = new Recorder()
  const steps = recorder.steps
  if (routeName !== null) steps.push({ step: 'route', route: routeName, exempt: route.exempt, overrides: route.override?.size ?? 0 })
  const verdict = decideRequest({ ...service, agentDecides: false }, route, { caller, method: input.method, url: input.path, rawHeaders }, newVerdict(), recorder)
  const outcome = verdict.outcome as Explanation['outcome']
  const decision = verdict.decision
  if (outcome !== 'exempt') {
    // Where the engine refused the request before intentions, the trace says so.
    const rejected = outcome === 'bad-path' ? 'path' : outcome === 'bad-header' ? 'header' : null
    steps.splice(routeName === null ? 0 : 1, 0, { step: 'normalization', path: canonicalPath(input.path, service.normalization), rejected })
  }
  let decidedBy: Explanation['decidedBy'] = null
  if (outcome === 'allow' || outcome === 'deny') {
    decidedBy = decider(steps, decision.reason)
    if (decidedBy.defaultPolicy) steps.push({ step: 'default', reason: decision.reason })
  }
  return { allow: decision.allow, reason: decision.reason, outcome, decidedBy, trace: steps }
}

/**
 * The rule and permission the decision names: decisions are the engine's own objects, whose
 * reason starts with the deciding rule's label and, for a permission, `, permission N (action)`.
 */
function decider (steps: readonly TraceStep[], reason: string): NonNullable<Explanation['decidedBy']> {
  for (let i = steps.length - 1; i >= 0; i--) {
    const s = steps[i] as TraceStep
    if (s.step === 'permission' && s.matched && reason.startsWith(`${s.intention}, permission ${s.permission} (`)) {
      return { intention: s.intention, permission: s.permission, defaultPolicy: false }
    }
    if (s.step === 'source' && s.matched && reason.startsWith(s.intention)) {
      return { intention: s.intention, permission: null, defaultPolicy: reason.includes('default policy') }
    }
  }
  return { intention: null, permission: null, defaultPolicy: true }
}
