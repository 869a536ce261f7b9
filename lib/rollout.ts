// Rollout tools wired into the plugin (docs/semantics.md#rollout): the candidate intentions, the
// enforcement in force for status() and the health route, and explain(). The per-request side
// (shadow, candidate comparison) lives in the Enforcer.
import type { FastifyBaseLogger } from 'fastify'
import { Candidate } from './candidate'
import { InvalidOptionError } from './errors'
import { explainRequest } from './explain'
import { emitToEach } from './log'
import type { ExplainInput, Explanation } from './explain'
import type { RouterOptions } from './intentions/path'
import type { ResolvedOptions } from './options'
import { SERVICE_POLICY } from './route-policy'
import type { RoutePolicies } from './route-policy'
import type { ConsulSync, RolloutStatus } from './sync'

export class Rollout {
  readonly candidate: Candidate | null
  readonly #opts: ResolvedOptions
  readonly #sync: ConsulSync
  readonly #routes: RoutePolicies
  readonly #router: RouterOptions

  constructor (opts: ResolvedOptions, sync: ConsulSync, routes: RoutePolicies, router: RouterOptions, log: FastifyBaseLogger) {
    this.#opts = opts
    this.#sync = sync
    this.#routes = routes
    this.#router = router
    this.candidate = opts.candidate === null
      ? null
      : new Candidate(opts.service, opts.candidate, log, () => sync.liveInputs, () => {
        // A throwing listener must not reach the file watcher's callback (it would crash the process).
        emitToEach(sync.events, 'candidate', sync.status(), log)
      })
    const candidate = this.candidate
    if (candidate !== null) sync.events.on('intentions', () => candidate.relive())
  }

  /** After the live inputs are in: a bad candidate is logged, never fatal. */
  async start (): Promise<void> {
    await this.candidate?.start()
  }

  stop (): void {
    this.candidate?.stop()
  }

  /** The plugin's mode, the routes whose own setting differs, and the candidate. */
  status (): RolloutStatus {
    const mode = this.#opts.enforcement
    const routes: RolloutStatus['enforcement']['routes'] = {}
    for (const [name, policy] of this.#routes.named) {
      if (policy.enforcement !== null && policy.enforcement !== mode) routes[name] = policy.enforcement
    }
    return { enforcement: { mode, routes }, candidate: this.candidate?.status() ?? null }
  }

  /** `fastify.consulNative.explain()`. */
  explain (input: ExplainInput): Explanation & { candidate?: Explanation } {
    let routeName: string | null = null
    let policy = SERVICE_POLICY
    if (input?.route !== undefined) {
      routeName = `${String(input.method)} ${String(input.route)}`
      const found = this.#routes.named.get(routeName)
      if (found === undefined) {
        throw new InvalidOptionError('explain.route', `no route ${routeName} was declared after the plugin (known: ${[...this.#routes.named.keys()].join(', ')})`)
      }
      policy = found
    }
    const sync = this.#sync
    const live = { policy: sync.policy, normalization: sync.normalization, router: policy.router ?? this.#router, agentDecides: false }
    const trustDomain = sync.status().trustDomain
    const explanation: Explanation & { candidate?: Explanation } = explainRequest(live, policy, routeName, input, trustDomain)
    const candidate = this.candidate?.policy ?? null
    if (candidate !== null) explanation.candidate = explainRequest({ ...live, policy: candidate }, policy, routeName, input, trustDomain)
    return explanation
  }
}
