"""The GDRT pipeline: curate -> train SFT -> group (reference = SFT) -> train GDRT -> evaluate both ->
attribute both -> report -> register. Resources, accelerators and caching are set here, nothing else.
"""


from kfp import dsl, kubernetes
from kfp.dsl import Markdown

from components.attribute.component import attribute
from components.curate.component import curate
from components.evaluate.component import evaluate
from components.group.component import group
from components.init_model.component import init_model
from components.register.component import register
from components.report.component import report
from components.tracking.component import start_tracking
from components.train.component import train
from gdrt_core.stages import PIPELINE_DEFAULTS as D
from pipelines import resources

PIPELINE_NAME = "gdrt"


def _gpu_training(task: dsl.PipelineTask, num_gpus, checkpoint_pvc) -> dsl.PipelineTask:
    """GPUs, GPU-node placement, a memory-backed /dev/shm and (optionally) the checkpoint/cache PVC."""
    task.set_accelerator_type(resources.ACCELERATOR)
    task.set_accelerator_limit(num_gpus)
    task.set_cpu_limit(resources.TRAIN_CPU)
    task.set_memory_limit(resources.TRAIN_MEMORY)
    key, _, value = resources.NODE_SELECTOR.partition("=")
    kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=resources.TOLERATION_KEY, operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=resources.SHM_SIZE)
    if checkpoint_pvc:
        kubernetes.mount_pvc(task, pvc_name=checkpoint_pvc, mount_path=resources.CACHE_MOUNT)
        task.set_env_variable("HF_HOME", f"{resources.CACHE_MOUNT}/hf-cache")
    task.set_caching_options(enable_caching=False)
    return task


def sft_group_gdrt(data, train_task, *, group_settings, num_groups, parent, name_suffix: str = ""):
    """Train SFT, group target tokens with it as the reference, train GDRT on those groups.
    `train_task(objective, groups=None, name=...)` makes the training step (single- or multi-node)."""
    sft = train_task("sft", name=f"train SFT{name_suffix}")
    groups = group(dataset=data.outputs["dataset"], reference=sft.outputs["model"], settings=group_settings,
                   num_groups=num_groups, parent_run_id=parent).set_display_name("group (reference = SFT)")
    gdrt = train_task("gdrt", groups=groups.outputs["groups"], name=f"train GDRT{name_suffix}")
    return sft, groups, gdrt


def evaluate_report_register(data, groups, sft, gdrt, *, parent, eval_split, eval_settings, valid_eval_settings,
                             attribute_settings, run_name, domain) -> dsl.PipelineTask:
    """The steps after training, shared by the single-node and multi-node pipelines: evaluate and attribute
    both models, the report, the GDRT valid evaluation and the registry step. Returns the report task."""
    evals, attributions = {}, {}
    for label, trained in (("sft", sft), ("gdrt", gdrt)):
        ev = evaluate(dataset=data.outputs["dataset"], model=trained.outputs["model"], split=eval_split,
                      settings=eval_settings, parent_run_id=parent, run_name=f"evaluate {label}")
        ev.set_display_name(f"evaluate {label.upper()}").set_caching_options(enable_caching=False)
        at = attribute(dataset=data.outputs["dataset"], model=trained.outputs["model"], split=eval_split,
                       settings=attribute_settings, parent_run_id=parent, run_name=f"attribute {label}",
                       groups=groups.outputs["groups"]).set_display_name(f"attribute {label.upper()}")
        evals[label], attributions[label] = ev, at
    rep = report(sft_eval=evals["sft"].outputs["evaluation"], gdrt_eval=evals["gdrt"].outputs["evaluation"],
                 sft_attribution=attributions["sft"].outputs["attribution"],
                 gdrt_attribution=attributions["gdrt"].outputs["attribution"], title=run_name,
                 parent_run_id=parent).set_display_name("report").set_caching_options(enable_caching=False)
    valid = evaluate(dataset=data.outputs["dataset"], model=gdrt.outputs["model"], split="valid",
                     settings=valid_eval_settings, parent_run_id=parent, run_name="evaluate gdrt (valid)")
    valid.set_display_name("evaluate GDRT (valid)").set_caching_options(enable_caching=False)
    register(model=gdrt.outputs["model"], dataset=data.outputs["dataset"],
             valid_eval=valid.outputs["evaluation"], domain=domain,
             parent_run_id=parent).set_display_name("register").after(rep).set_caching_options(enable_caching=False)
    return rep


def build_pipeline(*, cluster: bool = True, checkpoint_pvc=None):
    """The pipeline function. cluster=False leaves out the Kubernetes settings (the local runner)."""

    @dsl.pipeline(name=PIPELINE_NAME, description="GDRT vs SFT fine-tuning of an LLM recommender")
    def gdrt_pipeline(
        source: str = D["source"],
        source_format: str = D["source_format"],
        domain: str = D["domain"],
        base_model: str = D["base_model"],
        experiment: str = D["experiment"],
        run_name: str = D["run_name"],
        tau: float = D["tau"],
        num_groups: int = D["num_groups"],
        prior: str = D["prior"],
        num_gpus: int = D["num_gpus"],
        deepspeed: str = D["deepspeed"],
        eval_split: str = D["eval_split"],
        curate_settings: dict = D["curate_settings"],
        model_settings: dict = D["model_settings"],
        train_settings: dict = D["train_settings"],
        group_settings: dict = D["group_settings"],
        eval_settings: dict = D["eval_settings"],
        valid_eval_settings: dict = D["valid_eval_settings"],
        attribute_settings: dict = D["attribute_settings"],
        parent_run_id: str = "",
    ) -> Markdown:
        start = start_tracking(experiment=experiment, run_name=run_name, params={
            "source": source, "domain": domain, "base_model": base_model, "tau": tau, "num_groups": num_groups,
            "prior": prior,
        }, run_id=parent_run_id).set_display_name("mlflow: start run").set_caching_options(enable_caching=False)
        parent = start.output
        data = curate(source=source, source_format=source_format, domain=domain, settings=curate_settings,
                      parent_run_id=parent).set_display_name("curate")
        base = init_model(dataset=data.outputs["dataset"], base_model=base_model,
                          settings=model_settings).set_display_name("base model")

        def train_task(objective: str, groups=None, name: str = ""):
            extra = {"groups": groups} if groups is not None else {}
            task = train(dataset=data.outputs["dataset"], base=base.outputs["model"], objective=objective,
                         settings=train_settings, tau=tau, prior=prior, num_groups=num_groups, num_gpus=num_gpus,
                         deepspeed=deepspeed, parent_run_id=parent, run_name=f"train {objective}",
                         **extra).set_display_name(name)
            if cluster:
                _gpu_training(task, num_gpus, checkpoint_pvc)
            task.set_caching_options(enable_caching=False)
            return task

        sft, groups, gdrt = sft_group_gdrt(data, train_task, group_settings=group_settings, num_groups=num_groups,
                                           parent=parent)

        rep = evaluate_report_register(
            data, groups, sft, gdrt, parent=parent, eval_split=eval_split, eval_settings=eval_settings,
            valid_eval_settings=valid_eval_settings, attribute_settings=attribute_settings, run_name=run_name,
            domain=domain,
        )
        return rep.outputs["page"]

    return gdrt_pipeline
