// docs/semantics.md#test-vectors: every test vector, with the plugin's answer (the project's rules override Envoy's column
// for T31/T32). Each row runs the plugin's pipeline: canonicalPath on the raw target, then decide.
import t from 'tap'
import type { Intention, IntentionPermission, RequestNormalization } from '../lib/agent/wire'
import { ixn } from './helpers/intentions'
import { canonicalPath } from '../lib/intentions/path'
import { compilePolicy, decide } from '../lib/intentions/policy'
import { referenceDecide } from './helpers/reference-engine'
import { explainRequest } from '../lib/explain'
import { decideRequest, newVerdict } from '../lib/intentions/request'
import { SERVICE_POLICY } from '../lib/route-policy'

type Answer = 'allow' | 'deny' | 'unauthenticated' | 'rejected'

interface Vector {
  id: string
  intentions: Intention[]
  def: 'allow' | 'deny'
  protocol?: string
  /** 'name', 'ns/name' or 'partition/ns/name'. */
  source: string
  method?: string
  url?: string
  headers?: string[]
  normalization?: RequestNormalization
  answer: Answer
  /**
   * The whole request pipeline's answer when a router spelling adds a denial to the engine's
   * (docs/semantics.md#paths-guarantees); the engine's `answer` otherwise.
   */
  pipeline?: 'deny'
  why: string
}

const allow = (HTTP: IntentionPermission['HTTP']): IntentionPermission => ({ Action: 'allow', HTTP })
const deny = (HTTP: IntentionPermission['HTTP']): IntentionPermission => ({ Action: 'deny', HTTP })

const T6 = [ixn('web', 'api', 9, [deny({ PathPrefix: '/admin' }), allow({ PathPrefix: '/' })])]
const T23 = [ixn('web', 'api', 9, [allow({ Header: [{ Name: 'x-env', Exact: 'prod', Invert: true }] })])]
const T28 = [ixn('*/*', 'api', 7, 'allow'), ixn('team-a/*', 'api', 8, 'deny')]
const T44 = [ixn('web', 'api', 9, [deny({ PathExact: '/value/supersecret' })])]

const vectors: Vector[] = [
  { id: 'T1', intentions: [ixn('web', 'api', 9, 'allow')], def: 'deny', source: 'web', answer: 'allow', why: 'an exact L4 intention matches' },
  { id: 'T2', intentions: [ixn('web', 'api', 9, 'allow')], def: 'deny', source: 'billing', answer: 'deny', why: 'no intention applies, so the default (deny) decides' },
  { id: 'T3', intentions: [ixn('web', 'api', 9, 'deny')], def: 'allow', source: 'billing', answer: 'allow', why: 'no intention applies, so the default (allow) decides' },
  { id: 'T4', intentions: [ixn('*', 'api', 8, 'allow'), ixn('web', 'api', 9, 'deny')], def: 'deny', source: 'web', answer: 'deny', why: 'the exact source beats the wildcard' },
  { id: 'T5', intentions: [ixn('*', 'api', 8, 'allow'), ixn('web', 'api', 9, 'deny')], def: 'deny', source: 'cron', answer: 'allow', why: 'the wildcard applies to other sources' },
  { id: 'T6', intentions: T6, def: 'deny', source: 'web', url: '/admin/users', answer: 'deny', why: 'the first matching permission is deny' },
  { id: 'T7', intentions: T6, def: 'deny', source: 'web', url: '/public', answer: 'allow', why: 'the second permission is reached when the first does not match' },
  { id: 'T8', intentions: [ixn('*', 'api', 8, 'allow'), ixn('web', 'api', 9, [allow({ PathExact: '/ok' })])], def: 'deny', source: 'web', url: '/other', answer: 'deny', why: 'no permission matches: the default decides, no fall-through to *' },
  { id: 'T9', intentions: [ixn('*', 'api', 8, 'deny'), ixn('web', 'api', 9, [allow({ PathExact: '/ok' })])], def: 'allow', source: 'web', url: '/other', answer: 'allow', why: 'no permission matches: the default (allow) decides, the * deny is shadowed' },
  { id: 'T10', intentions: [ixn('*', 'api', 8, 'deny'), ixn('web', 'api', 9, [allow({ PathPrefix: '/api' })])], def: 'deny', source: 'web', url: '/api/x', answer: 'allow', why: 'the exact source L7 permission matches' },
  { id: 'T11', intentions: [ixn('web', 'api', 9, [allow({ PathExact: '/v1/items' })])], def: 'deny', source: 'web', url: '/v1/items/', answer: 'deny', why: 'PathExact is literal: a trailing slash differs' },
  { id: 'T12', intentions: [ixn('web', 'api', 9, [allow({ PathExact: '/v1/items' })])], def: 'deny', source: 'web', url: '/v1/items?limit=5', answer: 'allow', why: 'the query string is stripped before matching' },
  { id: 'T13', intentions: [ixn('web', 'api', 9, [deny({ PathPrefix: '/api' }), allow({ PathPrefix: '/' })])], def: 'deny', source: 'web', url: '/apix', answer: 'deny', why: 'PathPrefix is a raw prefix, not segment-aware' },
  { id: 'T14', intentions: [ixn('web', 'api', 9, [allow({ PathRegex: '/reg[ex]{2}' })])], def: 'deny', source: 'web', url: '/regexp', answer: 'deny', why: 'PathRegex must match the whole path' },
  { id: 'T15', intentions: [ixn('web', 'api', 9, [allow({ PathRegex: '/api/v[0-9]+/.*' })])], def: 'deny', source: 'web', url: '/api/v2/x', answer: 'allow', why: 'PathRegex matches the whole path' },
  { id: 'T16', intentions: [ixn('web', 'api', 9, [allow({ PathPrefix: '/', Methods: ['GET', 'PUT'] })])], def: 'deny', source: 'web', method: 'HEAD', answer: 'deny', why: 'HEAD is not in Methods' },
  { id: 'T17', intentions: [ixn('web', 'api', 9, [allow({ PathPrefix: '/', Methods: ['GET'] })])], def: 'deny', source: 'web', method: 'get', answer: 'deny', why: 'methods compare case-sensitively; Consul stored GET' },
  { id: 'T18', intentions: [ixn('web', 'api', 9, [allow({ Header: [{ Name: 'X-Env', Exact: 'prod' }] })])], def: 'deny', source: 'web', headers: ['x-env', 'prod'], answer: 'allow', why: 'header names are case-insensitive' },
  { id: 'T19', intentions: [ixn('web', 'api', 9, [allow({ Header: [{ Name: 'x-env', Exact: 'prod' }] })])], def: 'deny', source: 'web', headers: ['x-env', 'PROD'], answer: 'deny', why: 'header values are case-sensitive by default' },
  { id: 'T20', intentions: [ixn('web', 'api', 9, [allow({ Header: [{ Name: 'x-env', Exact: 'prod', IgnoreCase: true }] })])], def: 'deny', source: 'web', headers: ['x-env', 'PROD'], answer: 'allow', why: 'IgnoreCase compares without case' },
  { id: 'T21', intentions: [ixn('web', 'api', 9, [allow({ Header: [{ Name: 'x-debug', Present: true }] })])], def: 'deny', source: 'web', headers: ['x-debug', ''], answer: 'allow', why: 'Present holds for an empty value' },
  { id: 'T22', intentions: [ixn('web', 'api', 9, [allow({ Header: [{ Name: 'x-debug', Present: true, Invert: true }] })])], def: 'deny', source: 'web', answer: 'allow', why: 'Present with Invert means absent' },
  { id: 'T23', intentions: T23, def: 'deny', source: 'web', answer: 'deny', why: 'a missing header never matches a value matcher, even inverted' },
  { id: 'T24', intentions: T23, def: 'deny', source: 'web', headers: ['x-env', 'dev'], answer: 'allow', why: 'an inverted value matcher matches another value' },
  { id: 'T25', intentions: [ixn('web', 'api', 9, [allow({ Header: [{ Name: 'x-role', Exact: 'admin' }] })])], def: 'deny', source: 'web', headers: ['x-role', 'admin', 'x-role', 'user'], answer: 'deny', why: 'repeated headers are joined as "admin,user"' },
  { id: 'T26', intentions: [ixn('web', 'api', 9, [deny({ Header: [{ Name: 'x-role', Contains: 'admin', IgnoreCase: true }] }), allow({ PathPrefix: '/' })])], def: 'deny', source: 'web', headers: ['x-role', 'user', 'x-role', 'Admin'], answer: 'deny', why: 'Contains works on the joined value "user,Admin"' },
  { id: 'T27', intentions: [ixn('web', 'api', 9, [allow({ PathPrefix: '/a', Methods: ['POST'], Header: [{ Name: 'x-t', Present: true }] })])], def: 'deny', source: 'web', method: 'POST', url: '/a/b', answer: 'deny', why: 'all parts are ANDed and the header is missing' },
  { id: 'T28', intentions: T28, def: 'deny', source: 'team-a/web', answer: 'deny', why: 'the narrower namespace wildcard wins (ENT)' },
  { id: 'T29', intentions: T28, def: 'deny', source: 'team-b/web', answer: 'allow', why: '*/* matches any namespace (ENT)' },
  { id: 'T30', intentions: [ixn('web', 'api', 9, 'allow'), ixn('web', '*', 6, 'deny')], def: 'deny', source: 'web', answer: 'allow', why: 'the same source at lower precedence never decides' },
  { id: 'T31', intentions: [ixn('*', 'api', 8, 'deny'), ixn('web', '*', 6, 'allow')], def: 'deny', source: 'web', answer: 'deny', why: 'first match: the first matching intention (* → api deny) decides; Envoy would allow' },
  { id: 'T32', intentions: [ixn('*', 'api', 8, 'allow'), ixn('web', '*', 6, 'deny')], def: 'allow', source: 'web', answer: 'allow', why: 'first match: the first matching intention (* → api allow) decides; Envoy would deny' },
  { id: 'T33', intentions: [ixn('web', 'api', 9, [allow({ PathPrefix: '/' })])], def: 'allow', protocol: 'tcp', source: 'web', answer: 'deny', why: 'an L7 intention on a non-HTTP protocol denies' },
  { id: 'T34', intentions: [ixn('web', 'api', 9, [deny({ PathPrefix: '/admin' })])], def: 'deny', source: 'web', url: '/public', answer: 'deny', why: 'no permission matches: default deny' },
  { id: 'T35', intentions: [ixn('web', 'api', 9, [allow({ PathPrefix: '/public' })])], def: 'allow', source: 'web', url: '/admin', answer: 'allow', why: 'no permission matches: default allow' },
  { id: 'T36', intentions: [ixn('web', 'api', 9, [deny({ PathExact: '/pkg.Billing/Refund' }), allow({ PathPrefix: '/pkg.Billing/' })])], def: 'deny', protocol: 'grpc', source: 'web', method: 'POST', url: '/pkg.Billing/Refund', answer: 'deny', why: 'a gRPC method is its :path' },
  { id: 'T37', intentions: [ixn('web', 'api', 9, [deny({ Header: [{ Name: 'Host', Suffix: 'bad.com', IgnoreCase: true }] })])], def: 'allow', source: 'web', headers: ['Host', 'foo.BAD.com'], answer: 'deny', why: 'Host is :authority; Suffix ignoring case' },
  { id: 'T38', intentions: [ixn('web', 'api', 9, [allow({ Header: [{ Name: 'x-id', Regex: '[0-9]+' }] })])], def: 'deny', source: 'web', headers: ['x-id', '12a'], answer: 'deny', why: 'a header regex must match the whole value' },
  { id: 'T39', intentions: [ixn('web', 'api', 9, 'allow')], def: 'deny', source: 'web', answer: 'unauthenticated', why: 'a peer\'s service presents its own trust domain (or arrives via a mesh gateway identity): identity-level (trust domain pin, no peering)' },
  { id: 'T39 (engine)', intentions: [ixn('web', 'api', 9, 'allow', { SourcePeer: 'other' })], def: 'deny', source: 'web', answer: 'deny', why: 'the engine\'s side of T39: a peered intention never matches a local caller' },
  { id: 'T40', intentions: [ixn('*', 'api', 8, 'deny'), ixn('web', 'api', 9, [allow({ PathPrefix: '/api' })])], def: 'allow', source: 'web', url: '/admin', answer: 'allow', why: 'the exact L7 source shields from the * deny; the default (allow) decides' },
  { id: 'T41', intentions: [ixn('web', 'api', 9, 'allow')], def: 'deny', source: 'web', answer: 'unauthenticated', why: 'a foreign trust domain is rejected before the engine (trust domain pin)' },
  { id: 'T42', intentions: [ixn('web', 'api', 9, 'deny')], def: 'allow', source: 'web', answer: 'unauthenticated', why: 'a foreign trust domain is rejected before the engine (trust domain pin)' },
  { id: 'T43', intentions: [ixn('web', 'api', 9, 'allow')], def: 'deny', source: 'web', answer: 'allow', why: 'the datacenter is not part of the identity the engine matches' },
  { id: 'T44', intentions: T44, def: 'allow', source: 'web', url: '/value/%73upersecret', answer: 'deny', why: 'unreserved %73 is decoded to s' },
  { id: 'T45', intentions: T44, def: 'allow', source: 'web', url: '/value//supersecret', answer: 'allow', why: 'slashes are not merged by default' },
  { id: 'T45 (MergeSlashes)', intentions: T44, def: 'allow', source: 'web', url: '/value//supersecret', normalization: { MergeSlashes: true }, answer: 'deny', why: 'MergeSlashes merges them' },
  { id: 'T46', intentions: T44, def: 'allow', source: 'web', url: '/value%2Fsupersecret', answer: 'allow', pipeline: 'deny', why: 'escaped slashes are kept by default (the request still decodes them in a route parameter)' },
  { id: 'T46 (UNESCAPE_AND_FORWARD)', intentions: T44, def: 'allow', source: 'web', url: '/value%2Fsupersecret', normalization: { PathWithEscapedSlashesAction: 'UNESCAPE_AND_FORWARD' }, answer: 'deny', why: 'UNESCAPE_AND_FORWARD decodes %2F' },
  { id: 'T46 (REJECT_REQUEST)', intentions: T44, def: 'allow', source: 'web', url: '/value%2Fsupersecret', normalization: { PathWithEscapedSlashesAction: 'REJECT_REQUEST' }, answer: 'rejected', why: 'REJECT_REQUEST refuses the path (400)' },
  { id: 'T47', intentions: T44, def: 'allow', source: 'web', url: '/value\\supersecret', answer: 'deny', why: 'a backslash is a slash' }
]

t.test('the test vectors of docs/semantics.md#test-vectors, answered as the plugin answers', async (t) => {
  for (const v of vectors) {
    const method = v.method ?? 'GET'
    const url = v.url ?? '/'
    t.test(`${v.id}: ${v.answer} ${v.source} ${method} ${url}: ${v.why}`, async (t) => {
      if (v.answer === 'unauthenticated') {
        // Identity-level (401): this caller never reaches the engine, so there is nothing to decide here.
        t.pass('rejected before the engine: no verified local service identity')
        return
      }
      const path = canonicalPath(url, v.normalization ?? null)
      if (v.answer === 'rejected') {
        t.equal(path, null, 'canonicalPath refuses the path')
        return
      }
      t.type(path, 'string')
      const [name, ns = 'default', partition = ''] = v.source.split('/').reverse()
      const input = { destination: 'api', intentions: v.intentions, defaultAllow: v.def === 'allow', protocol: v.protocol ?? 'http' }
      const caller = { partition, namespace: ns, service: name }
      const req = { method, path: path as string, url, rawHeaders: v.headers ?? [] }
      const d = decide(compilePolicy(input), caller, req)
      t.equal(d.allow ? 'allow' : 'deny', v.answer, d.reason)
      t.same(d, referenceDecide(input, caller, req), 'the reference engine agrees, reason included')
      // docs/semantics.md#rollout-explain: explain answers what the request pipeline answers.
      const rules = { policy: compilePolicy(input), normalization: v.normalization ?? null, router: { caseSensitive: true, ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, useSemicolonDelimiter: false }, agentDecides: false }
      const headers: Record<string, string[]> = {}
      for (let i = 0; i < (v.headers ?? []).length; i += 2) (headers[(v.headers as string[])[i] as string] ??= []).push((v.headers as string[])[i + 1] as string)
      const explained = explainRequest(rules, SERVICE_POLICY, null, { source: v.source, method, path: url, headers })
      const real = decideRequest(rules, SERVICE_POLICY, { caller, method, url, rawHeaders: v.headers ?? [] }, newVerdict())
      t.same([explained.allow, explained.reason], [real.decision.allow, real.decision.reason], 'explain decides as the pipeline does')
      t.equal(explained.allow ? 'allow' : 'deny', v.pipeline ?? v.answer, 'explain gives the vector\'s answer')
      t.ok(explained.decidedBy?.defaultPolicy === true || explained.reason.startsWith(explained.decidedBy?.intention as string), 'the trace names the decider')
    })
  }
})

t.test('the table covers T1 to T47', async (t) => {
  const ids = new Set(vectors.map((v) => v.id.split(' ')[0]))
  for (let i = 1; i <= 47; i++) t.ok(ids.has(`T${i}`), `T${i}`)
})
