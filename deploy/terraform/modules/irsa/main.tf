# The S3 bucket the workloads share, and IAM roles for service accounts (IRSA): each Kubernetes service
# account gets a role that only a pod running as it can assume (the cluster's OIDC provider signs the
# pod's token; the trust policy pins namespace and name), allowed only the bucket prefixes it needs.

resource "aws_s3_bucket" "artifacts" {
  bucket        = var.bucket_name
  force_destroy = var.bucket_force_destroy
  tags          = var.tags
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    object_ownership = "BucketOwnerEnforced" # no ACLs: IAM policies alone decide access
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "aws:kms" # the AWS-managed aws/s3 key: no key policy to maintain
    }
    bucket_key_enabled = true # one KMS call per bucket key instead of one per object
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    id     = "old-versions-and-uploads"
    status = "Enabled"
    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.artifacts]
}

data "aws_iam_policy_document" "tls_only" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  policy = data.aws_iam_policy_document.tls_only.json

  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}

# --- one role per service account ------------------------------------------------------------------

data "aws_iam_policy_document" "assume" {
  for_each = var.service_accounts

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${each.value.namespace}:${each.key}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  for_each = var.service_accounts

  # visionloop-serve -> <prefix>-serve, mlflow -> <prefix>-mlflow: with the default prefix "visionloop"
  # these are the role names deploy/k8s/overlays/production puts in its placeholders
  name               = "${var.name_prefix}-${trimprefix(each.key, "visionloop-")}"
  description        = "IRSA role of service account ${each.value.namespace}/${each.key}"
  assume_role_policy = data.aws_iam_policy_document.assume[each.key].json
  tags               = var.tags
}

locals {
  # service accounts that reach the bucket at all (a role without prefixes gets no S3 permission)
  bucket_users = { for name, sa in var.service_accounts : name => sa if length(concat(sa.read, sa.write)) > 0 }
}

data "aws_iam_policy_document" "bucket" {
  for_each = local.bucket_users

  statement {
    sid       = "Locate"
    actions   = ["s3:GetBucketLocation"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid       = "ListOwnPrefixes"
    actions   = ["s3:ListBucket", "s3:ListBucketVersions"]
    resources = [aws_s3_bucket.artifacts.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      # "mlflow/..." and the bare "mlflow" some clients list first
      values = flatten([for p in concat(each.value.read, each.value.write) : ["${p}*", trimsuffix(p, "/")]])
    }
  }

  statement {
    sid       = "Read"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = [for p in concat(each.value.read, each.value.write) : "${aws_s3_bucket.artifacts.arn}/${p}*"]
  }

  dynamic "statement" {
    for_each = length(each.value.write) > 0 ? [each.value.write] : []
    content {
      sid = "Write"
      actions = [
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
      ]
      resources = [for p in statement.value : "${aws_s3_bucket.artifacts.arn}/${p}*"]
    }
  }
}

resource "aws_iam_role_policy" "bucket" {
  for_each = local.bucket_users

  name   = "s3-${var.bucket_name}"
  role   = aws_iam_role.this[each.key].id
  policy = data.aws_iam_policy_document.bucket[each.key].json
}
