# visionloop on EKS, production: network, cluster with a CPU and a GPU node group, ECR repositories,
# the artifact bucket with one IAM role per service account (IRSA), the NVIDIA device plugin and a
# default gp3 StorageClass (the last two in kubernetes.tf). README.md walks through apply → a GPU training job.

data "aws_caller_identity" "current" {}

locals {
  tags = merge(var.tags, {
    "app.kubernetes.io/part-of" = "visionloop"
    environment                 = var.environment
    managed-by                  = "terraform"
  })
  bucket_name = coalesce(var.artifact_bucket_name, "${var.cluster_name}-artifacts-${data.aws_caller_identity.current.account_id}")

  # Bucket layout, and what each workload's service account (deploy/k8s, namespace var.namespace) may do:
  #   mlflow/   MLflow artifacts (models, ONNX exports, reports); the MLflow server proxies them
  #             (--serve-artifacts), so it alone touches them: MLFLOW_ARTIFACTS_DESTINATION
  #   images/   prediction images kept for retraining on labelled traffic: VISIONLOOP_MONITOR__IMAGE_URL
  #   retrain/  retrain datasets the loop writes for the training pods: VISIONLOOP_LOOP__DATASET_URL
  #   datasets/ training data sources: VISIONLOOP_DATA__SOURCE=s3://<bucket>/datasets/<name>
  service_accounts = {
    "mlflow"           = { write = ["mlflow/"] }
    "visionloop-serve" = { write = ["images/"] }
    "visionloop-loop"  = { read = ["images/"], write = ["retrain/"] }
    "visionloop-train" = { read = ["datasets/", "retrain/"] }
  }
}

module "network" {
  source = "../../modules/network"

  name               = var.cluster_name
  cluster_name       = var.cluster_name
  cidr               = var.vpc_cidr
  az_count           = var.az_count
  single_nat_gateway = var.single_nat_gateway
}

module "eks" {
  source = "../../modules/eks"

  cluster_name         = var.cluster_name
  kubernetes_version   = var.kubernetes_version
  vpc_id               = module.network.vpc_id
  subnet_ids           = module.network.private_subnet_ids
  public_access_cidrs  = var.api_public_access_cidrs
  admin_principal_arns = var.admin_principal_arns

  cpu_instance_types = var.cpu_instance_types
  cpu_scaling        = { min = var.cpu_min_size, desired = var.cpu_desired_size, max = var.cpu_max_size }

  gpu_instance_types = var.gpu_instance_types
  gpu_ami_type       = var.gpu_ami_type
  gpu_capacity_type  = var.gpu_capacity_type
  gpu_scaling        = { min = var.gpu_min_size, desired = var.gpu_desired_size, max = var.gpu_max_size }
  gpu_disk_size      = var.gpu_disk_size
  gpus_per_node      = var.gpus_per_node
}

module "ecr" {
  source = "../../modules/ecr"

  repository_names = ["visionloop-serve", "visionloop-train"]
  keep_images      = var.ecr_keep_images
}

module "irsa" {
  source = "../../modules/irsa"

  name_prefix       = var.cluster_name
  oidc_provider_arn = module.eks.oidc_provider_arn
  oidc_issuer       = module.eks.oidc_issuer
  bucket_name       = local.bucket_name
  service_accounts  = { for name, sa in local.service_accounts : name => merge(sa, { namespace = var.namespace }) }
}
