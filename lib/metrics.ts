// Counters and gauges in the shape Prometheus clients use (prom-client's `metric.get()` result),
// so an exporter can publish them as they are, plus the text exposition format for a plain route.
import type { EnforcementCounters } from './enforcement'
import type { ConsulNativeStatus } from './sync'

export interface MetricValue {
  readonly value: number
  readonly labels: Readonly<Record<string, string>>
}

export interface MetricFamily {
  readonly name: string
  readonly help: string
  readonly type: 'counter' | 'gauge'
  readonly values: readonly MetricValue[]
}

/** The `outcome` label of each counter. */
const OUTCOME_LABELS: ReadonlyArray<readonly [keyof EnforcementCounters, string]> = [
  ['allowed', 'allowed'], ['denied', 'denied'], ['unauthenticated', 'unauthenticated'], ['rejected', 'rejected'],
  ['exempt', 'exempt'], ['shadowDenied', 'shadow_denied'], ['shadowUnauthenticated', 'shadow_unauthenticated']
]

/** Candidate disagreements by verdict, live then candidate (docs/semantics.md#rollout-candidate). */
export interface CandidateDisagreements { readonly allowDeny: number, readonly denyAllow: number }

export function metricFamilies (counters: EnforcementCounters, syncFailures: Readonly<Record<string, number>>,
  status: ConsulNativeStatus, now: number, disagreements: CandidateDisagreements | null = null): MetricFamily[] {
  const leafExpiry = status.leaf === null ? null : (Date.parse(status.leaf.validBefore) - now) / 1000
  const families: MetricFamily[] = [
    {
      name: 'consul_native_requests_total',
      help: 'Requests decided by fastify-consul-native, by outcome.',
      type: 'counter',
      values: OUTCOME_LABELS.map(([counter, outcome]) => ({ value: counters[counter], labels: { outcome } }))
    },
    {
      name: 'consul_native_sync_failures_total',
      help: 'Failed polls to the Consul agent and rejected updates, by watch.',
      type: 'counter',
      values: Object.entries(syncFailures).map(([watch, value]) => ({ value, labels: { watch } }))
    },
    {
      name: 'consul_native_ready',
      help: '1 when the leaf, roots and intentions are loaded and the leaf is valid.',
      type: 'gauge',
      values: [{ value: status.ready ? 1 : 0, labels: {} }]
    },
    {
      name: 'consul_native_leaf_expiry_seconds',
      help: 'Seconds until the leaf certificate expires.',
      type: 'gauge',
      values: leafExpiry === null ? [] : [{ value: Math.round(leafExpiry), labels: {} }]
    }
  ]
  if (disagreements !== null) {
    families.push({
      name: 'consul_native_candidate_disagreements_total',
      help: 'Requests the candidate intentions decide differently from the live ones, by verdict.',
      type: 'counter',
      values: [
        { value: disagreements.allowDeny, labels: { live: 'allow', candidate: 'deny' } },
        { value: disagreements.denyAllow, labels: { live: 'deny', candidate: 'allow' } }
      ]
    })
  }
  return families
}

/** The Prometheus text exposition format (version 0.0.4) of `families`. */
export function prometheusText (families: readonly MetricFamily[]): string {
  let out = ''
  for (const family of families) {
    out += `# HELP ${family.name} ${family.help}\n# TYPE ${family.name} ${family.type}\n`
    for (const { value, labels } of family.values) {
      const pairs = Object.entries(labels).map(([key, label]) => `${key}="${escapeLabel(label)}"`)
      out += `${family.name}${pairs.length === 0 ? '' : `{${pairs.join(',')}}`} ${value}\n`
    }
  }
  return out
}

function escapeLabel (value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"')
}
